"""The client side of one round, sans-I/O: one state class per protocol round.

:meth:`SecAggClient.start` returns the first message; :meth:`SecAggClient.receive` takes
each server message and returns what to send back. Every check an honest client must make
on the server's messages is here: signed roster, session binding, neighbour sets, the
consistency signatures, and never revealing both shares of one peer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from secagg import ckks, graph, kernels, shamir
from secagg.dp.encoding import decode_sum, to_ring
from secagg.dp.packing import dp_lane_bits, pack_ring, unpack_ring
from secagg.dp.participants import DPClient, PreparedNoise, rotation_key
from secagg.dp.rotation import padded_dim
from secagg.errors import (
    DecryptionBudgetExhausted,
    DecryptionError,
    GroupResultRefused,
    InputError,
    InvalidPublicKey,
    InvalidSignature,
    KeyEpochMismatch,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    SecAggError,
    ServerMisbehaviour,
    UnexpectedMessage,
)
from secagg.keys import (
    PUBLIC_KEY_BYTES,
    AgreementKey,
    IdentityKey,
    aead_decrypt,
    aead_encrypt,
    check_agreement_key,
    constant_time_equal,
    random_seed,
    verify_signature,
)
from secagg.messages import (
    Abort,
    AdvertiseKeys,
    AggregateResult,
    BlameRequest,
    BlameVerdict,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedInput,
    EncryptedResult,
    MaskedInput,
    Message,
    NonceReveal,
    NonceReveals,
    ResultVerdict,
    Roster,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    blame_verdict_payload,
    consistency_payload,
    decode_message,
    dp_share_kind,
    encrypted_input_payload,
    nonce_commitment,
    seed_commitment,
    share_commit_payload,
    share_commitment,
)
from secagg.params import Mode, RoundParams
from secagg.policy import ClientPolicy, check_contributors, check_layout
from secagg.prg import Purpose, StreamMask, derive_key
from secagg.quantize import lane_values
from secagg.rounds.advertise_keys import session_id_for
from secagg.rounds.base import Stage
from secagg.rounds.reveal_nonces import graph_seed
from secagg.rounds.unmasking import pair_sign

__all__ = ["ClientResult", "SecAggClient", "decrypt_lane_sums", "share_aad"]


def share_aad(session_id: bytes, sender: int, recipient: int) -> bytes:
    """Associated data of a share ciphertext: session and direction."""
    return session_id + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


@dataclass(frozen=True, eq=False)
class ClientResult:
    """What a client learns at the end of a round: the aggregate only."""

    sums: npt.NDArray[np.uint64]
    contributors: tuple[int, ...]
    total_weight: int
    weighted_sum: npt.NDArray[np.float64]

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        return self.weighted_sum / float(self.total_weight)


class _Secrets:
    """Per-round secrets of one client; never in ``repr``."""

    def __init__(self) -> None:
        self.enc = AgreementKey()
        self.mask = AgreementKey()
        self.seed = random_seed()
        self.rounding_key = random_seed()
        self.graph_nonce = random_seed()  # opened only after the roster is checked

    def __repr__(self) -> str:
        return "_Secrets(<redacted>)"


class _Ctx:
    """State the client's round states share."""

    def __init__(
        self,
        cid: int,
        identity: IdentityKey,
        params: RoundParams,
        directory: Mapping[int, bytes],
        x: Any,
        weight: int,
        rounding_key: bytes | None,
        he: ckks.SecretContext | None = None,
        policy: ClientPolicy | None = None,
    ) -> None:
        self.cid = cid
        self.he = he
        self.policy = policy if policy is not None else ClientPolicy()
        self.identity = identity
        self.params = params
        self.digest = params.digest()
        self.directory = directory
        self.x: Any = x  # float64 numpy vector, or a float device vector (None once used)
        self.weight = weight
        self.secrets = _Secrets()
        if rounding_key is not None:
            self.secrets.rounding_key = rounding_key
        self.session_id = b""
        self.roster: dict[int, AdvertiseKeys] = {}
        self.neighbours: frozenset[int] = frozenset()
        self.own_shares: tuple[bytes, bytes] = (b"", b"")
        self.peer_shares: dict[int, tuple[bytes, bytes]] = {}
        self.enc_shared: dict[int, bytes] = {}
        self.u1_peers: frozenset[int] = frozenset()
        self.u2: tuple[int, ...] = ()
        self.result: ClientResult | None = None
        self.error: SecAggError | None = None
        self.warnings: list[str] = []
        self.dp: DPClient | None = None
        self.dp_own: tuple[bytes, ...] = ()
        self.dp_peer: dict[int, tuple[bytes, ...]] = {}
        """DP rounds: this client's noise state, its own and its peers' noise-seed shares."""
        self.dp_prepared: PreparedNoise | None = None
        """DP rounds: noise drawn before the round, until ShareKeys takes (or drops) it."""
        self.group_round = False
        """A group round of a sharded ``hybrid``/``ckks`` round: its encrypted sum is the
        coordinator's; this member refuses it and decrypts the total only."""

    @property
    def rid(self) -> bytes:
        return self.params.round_id

    def share_key(self, peer: int, *, sender: int, recipient: int, dp: bool = False) -> bytes:
        """AES key of the share bundle from ``sender`` to ``recipient`` (one of them is us);
        ``dp``: of the DP noise-seed bundle (its own single-use key: one more id, ``1``)."""
        shared = self.enc_shared.get(peer)
        if shared is None:
            shared = self.enc_shared[peer] = self.secrets.enc.agree(self.roster[peer].enc_pk)
        ids = (sender, recipient, 1) if dp else (sender, recipient)
        return derive_key(shared, self.session_id, Purpose.SHARE_ENC, *ids)

    def misbehaviour(self, what: str) -> ServerMisbehaviour:
        return ServerMisbehaviour(what, client_id=self.cid)


class _State:
    stage: Stage
    accepts: type[Message]

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        raise NotImplementedError


class AdvertiseState(_State):
    """Round 0: keys and commitments advertised, waiting for the roster."""

    stage = Stage.ADVERTISE_KEYS
    accepts = Roster

    def first_message(self) -> AdvertiseKeys:
        c = self.ctx
        commit = seed_commitment(c.digest, c.cid, c.secrets.seed)
        nonce_commit = nonce_commitment(c.digest, c.cid, c.secrets.graph_nonce)
        keys = (c.secrets.enc.public, c.secrets.mask.public, commit)
        unsigned = AdvertiseKeys(c.rid, c.cid, *keys, bytes(64), nonce_commit)
        sig = c.identity.sign(unsigned.signed_payload(c.digest))
        return AdvertiseKeys(c.rid, c.cid, *keys, sig, nonce_commit)

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        assert isinstance(msg, Roster)
        c = self.ctx
        entries: dict[int, AdvertiseKeys] = {}
        for e in msg.entries:
            if e.sender in entries:
                raise c.misbehaviour(f"roster lists client {e.sender} twice")
            if e.sender not in c.directory:
                raise c.misbehaviour(f"roster lists unknown client {e.sender}")
            # Signatures are checked for the neighbours only, once the graph is known
            # (RevealState): the session id binds every entry (docs/threat-model.md).
            try:
                check_agreement_key(e.enc_pk, client_id=e.sender)
                check_agreement_key(e.mask_pk, client_id=e.sender)
            except InvalidPublicKey as exc:
                raise c.misbehaviour(
                    f"roster carries an unusable key of client {e.sender}: {exc}"
                ) from None
            if e.enc_pk == e.mask_pk:
                raise c.misbehaviour(f"client {e.sender} reuses one key for both purposes")
            entries[e.sender] = e
        own = entries.get(c.cid)
        if own is None or own.encode() != self.first_message_cached.encode():
            raise c.misbehaviour("roster does not carry this client's keys as sent")
        c.policy.check_set("the roster", len(entries), c.params)
        c.roster = entries
        c.session_id = session_id_for(c.digest, list(entries.values()), key_epoch(c))
        # The roster, hence every nonce commitment, is fixed: only now open ours.
        reveal = NonceReveal(c.rid, c.cid, c.session_id, c.secrets.graph_nonce)
        return RevealState(c), [reveal]

    first_message_cached: AdvertiseKeys


class RevealState(_State):
    """Round 0b: nonce revealed, waiting for every roster member's nonce."""

    stage = Stage.REVEAL_NONCES
    accepts = NonceReveals

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        assert isinstance(msg, NonceReveals)
        c = self.ctx
        if msg.session_id != c.session_id:
            raise c.misbehaviour("nonce reveals bound to another session")
        ids = [u for u, _ in msg.nonces]
        # Exactly the roster: a server free to leave reveals out could pick among subsets,
        # one graph draw per subset.
        if ids != sorted(c.roster):
            raise c.misbehaviour("nonce reveals do not name exactly the roster, in id order")
        nonces = dict(msg.nonces)
        if nonces[c.cid] != c.secrets.graph_nonce:
            raise c.misbehaviour("nonce reveals carry another nonce for this client")
        for u, nonce in msg.nonces:
            commit = nonce_commitment(c.digest, u, nonce)
            if not constant_time_equal(commit, c.roster[u].nonce_commit):
                raise c.misbehaviour(f"graph nonce of client {u} does not open its commitment")
        degree = min(c.params.degree, len(ids) - 1)
        seed = graph_seed(c.session_id, nonces)
        c.neighbours = graph.neighbours_of(ids, degree, seed, c.cid)
        verify_neighbours(c)
        return ShareKeysState(c), [deal_shares(c)]


def key_epoch(c: _Ctx) -> bytes:
    """What the session id binds of the CKKS key: its epoch fingerprint in hybrid rounds."""
    if c.params.mode is Mode.HYBRID and c.he is not None:
        return c.he.epoch.fingerprint
    return b""


def verify_neighbours(c: _Ctx) -> None:
    """Check the roster signature of every neighbour: ``k`` Ed25519 verifications, not ``n``.

    These are the only entries whose keys this client uses (share encryption, pairwise
    masks). A non-neighbour's entry reaches it only through the session id, which hashes the
    whole roster, and the graph seed, which one honest nonce (its own) makes uniform; an
    entry the server forged is a neighbour of some honest client of the same session, which
    verifies it and aborts (the argument: docs/threat-model.md, "Roster verification").
    Its own entry was compared byte for byte with what it sent.
    """
    for v in sorted(c.neighbours):
        e = c.roster[v]
        try:
            verify_signature(c.directory[v], e.signed_payload(c.digest), e.signature)
        except InvalidSignature:
            raise c.misbehaviour(f"roster entry of client {v} is not signed by it") from None


def deal_shares(c: _Ctx) -> ShareKeys:
    """Round 1's message: Shamir shares of the self-mask seed and the mask key for every
    holder ``N(u) ∪ {u}``, each neighbour's bundle under its pairwise AEAD key, and for every
    holder one signed commitment ``H_seed || H_key || sig`` to the two shares it gets.

    The signature (identity key, over :func:`secagg.messages.share_commit_payload`) is the
    evidence that binds this client to the shares it dealt: a holder checks its shares
    against it, the server checks revealed shares against it, and shares that match it but
    do not reconstruct the committed seed or key convict this client (docs/protocol.md)."""
    holders = sorted(c.neighbours | {c.cid})
    dp_seeds = start_dp(c)
    seed_sh, key_sh, *dp_sh = shamir.split_many(
        [c.secrets.seed, c.secrets.mask.private_bytes, *dp_seeds], c.params.threshold, holders
    )
    c.own_shares = (seed_sh[c.cid], key_sh[c.cid])
    c.dp_own = tuple(sh[c.cid] for sh in dp_sh)
    # noise drawn before the round: its salt is public and signed (empty without one, or
    # with nothing removable, L = 0: the server never regenerates a component then)
    salt = (c.dp.salt or b"") if c.dp is not None and dp_sh else b""
    sid = c.session_id
    commitments = []
    dp_commits = []
    for v in holders:
        h_seed = share_commitment(sid, c.cid, v, b"seed", seed_sh[v])
        h_key = share_commitment(sid, c.cid, v, b"key", key_sh[v])
        h_dp = b"".join(
            share_commitment(sid, c.cid, v, dp_share_kind(k), sh[v]) for k, sh in enumerate(dp_sh)
        )
        sig = c.identity.sign(share_commit_payload(sid, c.cid, v, h_seed, h_key, h_dp, salt))
        commitments.append((v, h_seed + h_key + sig))
        if dp_sh:
            dp_commits.append((v, h_dp))
    bundles = []
    dp_bundles = []
    for v in sorted(c.neighbours):
        key = c.share_key(v, sender=c.cid, recipient=v)
        pt = seed_sh[v] + key_sh[v]
        bundles.append((v, aead_encrypt(key, pt, share_aad(sid, c.cid, v))))
        if dp_sh:
            dp_key = c.share_key(v, sender=c.cid, recipient=v, dp=True)
            dp_pt = b"".join(sh[v] for sh in dp_sh)
            dp_bundles.append((v, aead_encrypt(dp_key, dp_pt, share_aad(sid, c.cid, v))))
    return ShareKeys(
        c.rid,
        c.cid,
        sid,
        tuple(bundles),
        tuple(commitments),
        len(dp_sh),
        tuple(dp_bundles),
        tuple(dp_commits),
        salt,
    )


def start_dp(c: _Ctx) -> list[bytes]:
    """DP rounds: draw this client's noise seeds (the offer was checked against its policy
    before the first message) and return the ``m`` removable ones to share with ``b_u``."""
    offer = c.params.dp
    prepared, c.dp_prepared = c.dp_prepared, None
    if offer is None:
        if prepared is not None:
            prepared.discard()
        return []
    c.dp = DPClient(offer, c.policy.dp, client_id=c.cid, session_id=c.session_id, prepared=prepared)
    return c.dp.shared_seeds


def accept_share(
    c: _Ctx,
    dealer: int,
    ciphertext: bytes,
    commitment: bytes | None,
    dp: tuple[bytes | None, bytes | None] = (None, None),
    dp_salt: bytes = b"",
) -> tuple[bytes, bytes] | None:
    """The two shares ``dealer`` sent this client, or ``None`` (with a warning naming the
    dealer) when they fail the AEAD or do not match the dealer's commitment digests.

    Outside DP rounds the commitment's signature is not verified here (``k`` Ed25519
    verifications a client saved, issue 14): the AEAD, under a key only this client and
    the dealer can derive (the dealer's ``enc_pk`` was verified with its roster entry),
    already proves the shares are the dealer's, and the digests, from the server, are
    checked against them. The
    signature is evidence for the server's blame only, and the server holds the dealer's
    own copy of it: unmasking verifies the signatures of the commitments it cites, and sets
    aside shares under none (:func:`secagg.rounds.unmasking.unmask`; docs/threat-model.md,
    "Share commitments: checked by the holder, signed for the server").

    DP rounds with removable components: ``dp`` is the dealer's DP bundle and its ``L``
    share commitments; they must decrypt and match too, and land in ``c.dp_peer``. These
    rounds still verify the signature, which covers ``h_dp`` and the dealer's precompute
    salt ``dp_salt`` (docs/dp.md: holders refuse a salt the server swapped or invented).

    Nothing here raises: a peer's bad bundle costs this client that one share, never the
    round (docs/protocol.md, "Shares with evidence").
    """
    sid = c.session_id
    if commitment is None:
        c.warnings.append(f"share bundle from client {dealer} came without its commitment")
        return None
    h_seed, h_key, sig = commitment[:32], commitment[32:64], commitment[64:]
    dp_ct, h_dp = dp
    if c.dp is not None and c.dp.shared_seeds and (dp_ct is None or h_dp is None):
        # (a plan with one component, t = n, has no removable seeds and no DP bundle)
        c.warnings.append(f"share bundle from client {dealer} came without its DP shares")
        return None
    try:
        key = c.share_key(dealer, sender=dealer, recipient=c.cid)
        pt = aead_decrypt(key, ciphertext, share_aad(sid, dealer, c.cid), client_id=dealer)
        dp_pt = b""
        if dp_ct is not None:
            dp_key = c.share_key(dealer, sender=dealer, recipient=c.cid, dp=True)
            dp_pt = aead_decrypt(dp_key, dp_ct, share_aad(sid, dealer, c.cid), client_id=dealer)
    except DecryptionError:
        c.warnings.append(f"share bundle from client {dealer} failed authentication")
        return None
    if c.dp is not None and c.dp.shared_seeds:
        # DP rounds keep the check (docs/dp.md, "Wire"): the dealer's precompute salt
        # reaches the holder only under this signature, and holders refuse a salt the
        # server swapped, invented or stripped.
        try:
            payload = share_commit_payload(sid, dealer, c.cid, h_seed, h_key, h_dp or b"", dp_salt)
            verify_signature(c.directory[dealer], payload, sig)
        except InvalidSignature:
            c.warnings.append(f"share commitment of client {dealer} is not signed by it")
            return None
    seed_share, key_share = pt[: shamir.SHARE_BYTES], pt[shamir.SHARE_BYTES :]
    if not (
        constant_time_equal(share_commitment(sid, dealer, c.cid, b"seed", seed_share), h_seed)
        and constant_time_equal(share_commitment(sid, dealer, c.cid, b"key", key_share), h_key)
    ):
        c.warnings.append(f"shares from client {dealer} do not match its signed commitment")
        return None
    if h_dp is not None:
        size = shamir.SHARE_BYTES
        dp_shares = tuple(dp_pt[i : i + size] for i in range(0, len(dp_pt), size))
        if not all(
            constant_time_equal(
                share_commitment(sid, dealer, c.cid, dp_share_kind(k), sh),
                h_dp[32 * k : 32 * k + 32],
            )
            for k, sh in enumerate(dp_shares)
        ):
            c.warnings.append(f"DP shares from client {dealer} do not match its commitment")
            return None
        c.dp_peer[dealer] = dp_shares
    return seed_share, key_share


class ShareKeysState(_State):
    """Round 1: shares sent, waiting for the shares addressed to this client."""

    stage = Stage.SHARE_KEYS
    accepts = ShareDelivery

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        assert isinstance(msg, ShareDelivery)
        c = self.ctx
        if msg.session_id != c.session_id:
            raise c.misbehaviour("share delivery bound to another session")
        senders = [u for u, _ in msg.shares]
        if len(set(senders)) != len(senders) or not set(senders) <= c.neighbours:
            raise c.misbehaviour("share delivery from clients that are not neighbours")
        if len(senders) + 1 < c.params.threshold:
            raise RoundAborted(
                Stage.SHARE_KEYS,
                f"only {len(senders)} neighbours shared keys; threshold {c.params.threshold}",
            )
        committed = [u for u, _ in msg.commitments]
        if len(set(committed)) != len(committed) or set(committed) != set(senders):
            raise c.misbehaviour("share delivery's commitments do not match its senders")
        commitments = dict(msg.commitments)
        want_dp = 0 if c.dp is None else len(c.dp.shared_seeds)
        if msg.dp_components != want_dp:
            raise c.misbehaviour(
                f"share delivery carries {msg.dp_components} DP seed shares; the round has"
                f" {want_dp}"
            )
        dp_cts, dp_commits = dict(msg.dp_shares), dict(msg.dp_commitments)
        salts = dict(msg.dp_salts)
        if len(salts) != len(msg.dp_salts) or not set(salts) <= set(senders):
            raise c.misbehaviour("share delivery's DP salts do not match its senders")
        for u, ct in msg.shares:
            dp = (dp_cts.get(u), dp_commits.get(u)) if want_dp else (None, None)
            got = accept_share(c, u, ct, commitments.get(u), dp, salts.get(u, b""))
            if got is not None:
                c.peer_shares[u] = got
        c.u1_peers = frozenset(senders)
        c.enc_shared.clear()
        masks = [
            StreamMask(
                derive_key(c.secrets.seed, c.session_id, Purpose.SELF_MASK, c.cid),
                Purpose.SELF_MASK,
                1,
            )
        ]
        for v in sorted(c.u1_peers):
            shared = c.secrets.mask.agree(c.roster[v].mask_pk)
            key = derive_key(shared, c.session_id, Purpose.PAIR_MASK, min(c.cid, v), max(c.cid, v))
            masks.append(StreamMask(key, Purpose.PAIR_MASK, pair_sign(c.cid, v)))
        assert c.x is not None
        out: Message
        if c.he is not None:
            out = encrypted_input(c, c.session_id, masks)
        elif c.dp is not None:
            out = MaskedInput(c.rid, c.cid, c.session_id, dp_masked_words(c, masks))
        else:
            q = c.params.quant
            words = kernels.mask_vector(c.x, c.weight, q, c.secrets.rounding_key, masks)
            # A device update gives device words: only the masked words cross to the host.
            out = MaskedInput(c.rid, c.cid, c.session_id, kernels.to_host(words))
        c.x = None  # the plaintext update is no longer needed
        return MaskedInputState(c), [out]


def dp_masked_words(c: _Ctx, masks: list[StreamMask]) -> npt.NDArray[np.uint64]:
    """DP rounds: ``DPClient.encode(x)`` (clip, rotate, round, noise, mod ``2^b``) packed
    into lanes of ``b + ceil(log2 n)`` bits, then masked like any upload."""
    assert c.dp is not None and c.x is not None
    p = c.params
    ring = c.dp.encode(kernels.to_host(c.x))
    offer = c.dp.offer
    words = pack_ring(ring, dp_lane_bits(offer.bits, p.n_clients), p.words)
    kernels.add_masks(words, masks)
    return words


def encrypted_input(c: _Ctx, session_id: bytes, masks: list[StreamMask]) -> EncryptedInput:
    """CKKS ciphertexts of the client's packed slots, masked modulo ``2^mask_bits`` in
    ``hybrid`` mode (``masks`` empty in ``ckks`` mode), signed with the identity key."""
    assert c.he is not None and c.x is not None
    he = c.params.he
    # TenSEAL encrypts on the CPU, so a device update is copied to the host here.
    if c.dp is not None:  # hybrid DP: the d' ring values mod 2^b in lanes of b + ceil(log2 n)
        values = c.dp.encode(kernels.to_host(c.x))
    else:
        values = lane_values(kernels.to_host(c.x), c.weight, c.params.quant, c.secrets.rounding_key)
    slots = ckks.pack_lanes(values, he)
    if masks:
        stream = np.zeros(he.n_slots, dtype=np.uint64)
        kernels.add_masks(stream, masks)
        slots = ckks.add_masks(slots, ckks.masks_from_words(stream, he), he)
    cts = tuple(ckks.encrypt(c.he, slots))
    sig = c.identity.sign(encrypted_input_payload(session_id, c.cid, cts))
    return EncryptedInput(c.rid, c.cid, session_id, cts, sig)


def decrypt_lane_sums(
    secret: ckks.SecretContext, params: RoundParams, ciphertexts: Sequence[bytes]
) -> npt.NDArray[np.uint64]:
    """Lane sums from an encrypted sum: decrypt, reduce modulo the mask modulus (hybrid),
    unpack. Only integers leave :func:`secagg.ckks.decrypt` (IND-CPA-D, Li–Micciancio 2021).

    Raises
    ------
    SecAggError
        What :func:`secagg.ckks.decrypt` raises for a malformed or undecryptable sum.
    """
    he = params.he
    slot_sums = ckks.decrypt(secret, ciphertexts)
    if params.mode is Mode.HYBRID:
        slot_sums = ckks.unmask_sum(slot_sums, he)
    return ckks.unpack_lanes(slot_sums, he, he.n_values)


def decrypt_result(c: _Ctx, ciphertexts: tuple[bytes, ...]) -> npt.NDArray[np.uint64]:
    """:func:`decrypt_lane_sums` for this client; a sum that does not decrypt is the
    server's misbehaviour."""
    assert c.he is not None
    try:
        return decrypt_lane_sums(c.he, c.params, ciphertexts)
    except DecryptionBudgetExhausted:
        raise  # this key holder's own limit, not the server's fault
    except SecAggError as exc:
        raise c.misbehaviour(f"encrypted result does not decrypt: {exc}") from None


class MaskedInputState(_State):
    """Round 2: masked input sent, waiting for the survivor set to sign."""

    stage = Stage.MASKED_INPUT
    accepts = ConsistencyRequest

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        assert isinstance(msg, ConsistencyRequest)
        c = self.ctx
        if msg.session_id != c.session_id:
            raise c.misbehaviour("consistency request bound to another session")
        u2 = msg.survivors
        if list(u2) != sorted(set(u2)):
            raise c.misbehaviour("survivor list is not sorted and unique")
        if c.cid not in u2:
            raise c.misbehaviour("survivor list omits this client, which sent its input")
        if not set(u2) <= set(c.roster):
            raise c.misbehaviour("survivor list names clients outside the roster")
        if not (set(u2) & c.neighbours) <= c.u1_peers:
            raise c.misbehaviour("survivor list names neighbours that never shared keys")
        c.policy.check_set("the survivor list", len(u2), c.params)
        c.u2 = u2
        sig = c.identity.sign(consistency_payload(c.session_id, u2))
        return ConsistencyState(c), [ConsistencySignature(c.rid, c.cid, c.session_id, sig)]


class ConsistencyState(_State):
    """Round 3: signature sent, waiting for the unmask request."""

    stage = Stage.CONSISTENCY
    accepts = UnmaskRequest

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        assert isinstance(msg, UnmaskRequest)
        c = self.ctx
        if msg.session_id != c.session_id:
            raise c.misbehaviour("unmask request bound to another session")
        alive, dropped = set(msg.alive), set(msg.dropped)
        if msg.alive != c.u2:
            raise c.misbehaviour("unmask request's survivor set differs from the signed one")
        if alive & dropped:
            raise c.misbehaviour(
                f"clients {sorted(alive & dropped)} listed as both alive and dropped"
            )
        if len(set(msg.dropped)) != len(msg.dropped):
            raise c.misbehaviour("dropped list has duplicates")
        if not (dropped & c.neighbours) <= c.u1_peers:
            raise c.misbehaviour("dropped list names neighbours that never shared keys")
        if not dropped <= set(c.roster):
            raise c.misbehaviour("dropped list names clients outside the roster")
        # Every neighbour that shared keys is either a survivor or dropped: no third case.
        if not c.u1_peers <= alive | dropped:
            raise c.misbehaviour("unmask request leaves some neighbours unaccounted for")
        check_consistency(c, msg.signatures, alive)
        dp_shares = reveal_dp_shares(c)
        seed_shares = []
        key_shares = []
        if c.cid in alive:
            seed_shares.append((c.cid, c.own_shares[0]))
        for peer in sorted(c.peer_shares):
            if peer in alive:
                seed_shares.append((peer, c.peer_shares[peer][0]))
            elif peer in dropped:
                key_shares.append((peer, c.peer_shares[peer][1]))
        c.peer_shares.clear()
        out = UnmaskShares(
            c.rid, c.cid, c.session_id, tuple(seed_shares), tuple(key_shares), dp_shares
        )
        return UnmaskingState(c), [out]


def reveal_dp_shares(c: _Ctx) -> tuple[tuple[int, int, bytes], ...]:
    """DP rounds: for every signed survivor this client holds shares of (itself included),
    its shares of the noise seeds ``plan.removed(|U|)``, computed from this client's OWN view
    of the signed survivor set (``DPClient.reveal``), whatever the server would like removed."""
    if c.dp is None:
        return ()
    alive = set(c.u2)
    removed = c.dp.reveal(c.u2, sorted(c.roster))
    held = {c.cid: c.dp_own} if c.cid in alive else {}
    held.update((u, sh) for u, sh in c.dp_peer.items() if u in alive and u in c.peer_shares)
    out = tuple((u, k, held[u][k]) for u in sorted(held) for k in removed)
    c.dp_peer.clear()
    c.dp_own = ()
    return out


def check_consistency(c: _Ctx, signatures: Sequence[tuple[int, bytes]], alive: set[int]) -> None:
    """Require ``t`` valid consistency signatures, verifying ``t``, not every one sent.

    Every listed signer must be a distinct survivor (a set check over all of them); only the
    first ``t`` signatures are verified, which is all the argument uses (Bonawitz et al.
    2017, round 3): ``t`` directory keys vouch that this session, hence this whole roster,
    and this survivor set are the ones they were shown. An invalid one among those aborts.
    """
    signers = [s for s, _ in signatures]
    if len(set(signers)) != len(signers) or not set(signers) <= alive:
        raise c.misbehaviour("consistency signatures repeat or come from non-survivors")
    t = c.params.threshold
    if len(signatures) < t:
        raise c.misbehaviour(f"only {len(signatures)} consistency signatures; t={t}")
    payload = consistency_payload(c.session_id, c.u2)
    for signer, sig in signatures[:t]:
        try:
            verify_signature(c.directory[signer], payload, sig)
        except InvalidSignature:
            raise c.misbehaviour(f"consistency signature of client {signer} is invalid") from None


class UnmaskingState(_State):
    """Round 4: shares revealed, waiting for the aggregate (encrypted in hybrid mode)."""

    stage = Stage.UNMASKING
    accepts: type[Message] = AggregateResult

    def __init__(self, ctx: _Ctx) -> None:
        super().__init__(ctx)
        if ctx.he is not None:
            self.accepts = EncryptedResult

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        assert isinstance(msg, AggregateResult | EncryptedResult)
        c = self.ctx
        if msg.session_id != c.session_id:
            raise c.misbehaviour("result bound to another session")
        if msg.contributors != c.u2:
            raise c.misbehaviour("result's contributor set differs from the signed one")
        check_contributors(msg.contributors, c.params, c.policy)
        if isinstance(msg, AggregateResult):
            p = c.params
            if msg.words.size != p.words:
                raise c.misbehaviour("result has the wrong length")
            if c.dp is not None:
                return dp_result(c, msg), []
            sums = kernels.unpack(msg.words, p.quant, p.quant.values(p.dim))
        elif c.group_round:
            return group_notice(c, msg), []
        elif c.params.mode is Mode.HYBRID:
            return hybrid_verdict(c, msg)
        else:
            sums = decrypt_result(c, msg.ciphertexts)
        return finish_result(c, sums, msg.contributors), []


def group_notice(c: _Ctx, msg: EncryptedResult) -> _State:
    """A group round of a sharded ``hybrid``/``ckks`` round ends with the server's notice:
    the contributors (checked by the caller), no ciphertext. The group's sum goes to the
    coordinator only; this member decrypts the total alone (one decryption of its budget a
    round). A notice carrying ciphertexts is refused before anything is decrypted: decrypting
    it would reveal the group's sum to this member.

    The result holds the contributors only (no lane sums, weight 0).

    Raises
    ------
    GroupResultRefused
        The server sent the group's encrypted sum (or a DP removal) to this member.
    """
    if msg.ciphertexts or msg.dp_removal:
        raise GroupResultRefused(
            f"the server sent this member {len(msg.ciphertexts)} ciphertexts of its group's"
            " sum; in a sharded round a member decrypts the total only",
            client_id=c.cid,
        )
    empty = np.zeros(0, dtype=np.uint64)
    c.result = ClientResult(empty, msg.contributors, 0, np.zeros(0, dtype=np.float64))
    return _Final(c, Stage.COMPLETED)


def hybrid_verdict(c: _Ctx, msg: EncryptedResult) -> tuple[_State, list[Message]]:
    """hybrid: decrypt the sum and tell the server whether it holds in-range lanes.

    A sum that decrypts completes the round here. One whose values are off integers, out of
    range or with non-zero padding (:class:`~secagg.errors.DecryptionError`) was spoiled by
    an upload or by the server: this client rejects it and waits to check uploads
    (:class:`BlameWaitState`). A malformed sum is the server's alone (misbehaviour).
    """
    assert c.he is not None
    verdict = ResultVerdict(c.rid, c.cid, c.session_id, True)
    try:
        sums = decrypt_lane_sums(c.he, c.params, msg.ciphertexts)
    except DecryptionError as exc:
        c.warnings.append(f"encrypted result does not decrypt: {exc}")
        return BlameWaitState(c), [ResultVerdict(c.rid, c.cid, c.session_id, False)]
    except DecryptionBudgetExhausted:
        raise
    except SecAggError as exc:
        raise c.misbehaviour(f"encrypted result does not decrypt: {exc}") from None
    if c.dp is not None:
        return dp_hybrid_result(c, sums, msg), [verdict]
    return finish_result(c, sums, msg.contributors), [verdict]


def hybrid_dp_ring(
    params: RoundParams, sums: npt.NDArray[np.uint64], removal: bytes
) -> npt.NDArray[np.uint64]:
    """The released ring sum of a hybrid DP round: decrypted lane sums plus the published
    removal, mod ``2^b``.

    Raises
    ------
    MalformedMessage
        If ``removal`` is not one packed DP vector.
    """
    o = params.dp
    assert o is not None
    d, lane = padded_dim(o.dim), dp_lane_bits(o.bits, params.n_clients)
    if len(removal) != 8 * -(-d // (64 // lane)) or sums.size < d:
        raise MalformedMessage(f"encrypted result carries {len(removal)} bytes of DP removal")
    minus = unpack_ring(np.frombuffer(removal, dtype="<u8").astype(np.uint64), lane, d, o.bits)
    return to_ring((sums[:d] + minus).astype(np.int64), o.bits)


def dp_hybrid_result(c: _Ctx, sums: npt.NDArray[np.uint64], msg: EncryptedResult) -> _State:
    """Hybrid DP: decrypted lane sums mod ``2^b`` plus the server's published removal
    (``-sum of removable components mod 2^b``), decoded as in the masked round."""
    assert c.dp is not None
    o = c.dp.offer
    try:
        ring = hybrid_dp_ring(c.params, sums, msg.dp_removal)
    except MalformedMessage as exc:
        raise c.misbehaviour(str(exc)) from None
    released = decode_sum(
        ring, bits=o.bits, gamma=o.gamma, rotation_key=rotation_key(c.session_id), dim=o.dim
    )
    c.result = ClientResult(ring, msg.contributors, len(msg.contributors), released)
    return _Final(c, Stage.COMPLETED)


class BlameWaitState(_State):
    """Round 6 (hybrid): this client rejected the sum; it may be asked to check uploads.

    Only a client whose own decryption of the sum failed gets here: one that decrypted it
    is completed and refuses any blame request. Every value in the request is checked
    before a decryption: session, size against ``policy.max_blame_checks``, senders within
    the signed survivor set and never this client, each upload signed by its sender over
    this session (:func:`secagg.he_blame.check_uploads`), the budget for all of them.
    """

    stage = Stage.BLAME
    accepts = BlameRequest

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        from secagg.he_blame import check_uploads

        assert isinstance(msg, BlameRequest)
        c = self.ctx
        assert c.he is not None
        if msg.session_id != c.session_id:
            raise c.misbehaviour("blame request bound to another session")
        n, most = len(msg.uploads), c.policy.max_blame_checks
        if not 0 < n <= most:
            raise c.misbehaviour(f"blame request asks for {n} checks; the policy allows 1..{most}")
        senders = [u.sender for u in msg.uploads]
        if c.cid in senders:
            raise c.misbehaviour("blame request asks this client to check its own upload")
        if not set(senders) <= set(c.u2):
            raise c.misbehaviour("blame request holds uploads of clients outside the survivors")
        report = check_uploads(c.he, c.params, c.session_id, c.directory, msg.uploads)
        blamed = tuple(sorted(report.blamed.items()))
        payload = blame_verdict_payload(c.session_id, c.cid, report.checked, blamed)
        sig = c.identity.sign(payload)
        verdict = BlameVerdict(c.rid, c.cid, c.session_id, report.checked, blamed, sig)
        return _Final(c, Stage.BLAME), [verdict]


def dp_result(c: _Ctx, msg: AggregateResult) -> _State:
    """DP rounds: the published released ring sum (lanes reduced mod ``2^b``), decoded:
    centred, divided by ``gamma``, rotated back. ``sums`` holds the ``d'`` ring values."""
    assert c.dp is not None
    o = c.dp.offer
    ring = unpack_ring(
        msg.words, dp_lane_bits(o.bits, c.params.n_clients), padded_dim(o.dim), o.bits
    )
    released = decode_sum(
        ring, bits=o.bits, gamma=o.gamma, rotation_key=rotation_key(c.session_id), dim=o.dim
    )
    c.result = ClientResult(ring, msg.contributors, len(msg.contributors), released)
    return _Final(c, Stage.COMPLETED)


def finish_result(c: _Ctx, sums: npt.NDArray[np.uint64], contributors: tuple[int, ...]) -> _State:
    """Check and dequantize the lane sums; the client's round is complete."""
    p = c.params
    if sums.size != p.quant.values(p.dim):
        raise c.misbehaviour("result has the wrong length")
    weighted_sum, total = kernels.dequantize(sums, p.quant, len(contributors), p.dim)
    c.result = ClientResult(sums, contributors, total, weighted_sum)
    return _Final(c, Stage.COMPLETED)


class _Final(_State):
    accepts = Message
    """Terminal states, and the wait for the server's abort after a blame verdict."""

    def __init__(self, ctx: _Ctx, stage: Stage) -> None:
        super().__init__(ctx)
        self.stage = stage

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        raise UnexpectedMessage(f"the round is {self.stage}", client_id=self.ctx.cid)


class SecAggClient:
    """One client's participation in one masked round.

    Parameters
    ----------
    client_id:
        This client's id in the round (1..2^32-1).
    identity:
        Its long-term Ed25519 key; ``directory[client_id]`` must be its public key.
    params:
        The round parameters (the same for every participant).
    directory:
        Client id -> Ed25519 public key of every invited client, from a source the client
        trusts (enrolment), not from the server alone.
    x:
        The update to aggregate: ``params.dim`` real values. A flat float32/float64 CUDA
        array (``__cuda_array_interface__``: a torch CUDA tensor, a Numba device array)
        stays on the device: ``masked`` rounds quantize, pack and mask it with the CUDA
        kernels and only the masked words come to the host; ``hybrid`` and ``ckks`` copy
        it to the host once for TenSEAL.
    weight:
        Integer weight (sample count), ``1..params.quant.max_weight``.
    rounding_key:
        32-byte key of the stochastic-rounding stream; fresh from the CSPRNG by default.
        Fixing it makes the quantized input reproducible (tests, audits).
    he_context:
        ``hybrid`` mode: the key holders' CKKS context (with the secret key).
    policy:
        This client's own requirements of the round (:class:`secagg.policy.ClientPolicy`,
        secure by default). ``params`` are checked against it here, before any message,
        and every roster, survivor and contributor set the server sends later.
    layout:
        The fingerprint of the update's layout, when the caller knows it; it must equal
        ``params.layout`` when the round carries one.
    key_epoch:
        ``hybrid``: the round's CKKS key-epoch fingerprint as announced to this client; a
        context of another epoch is refused here, before any message. Either way the
        session id binds the context's own epoch, so the server refuses the client's
        messages after the roster if the epochs differ.
    dp_prepared:
        DP rounds: noise drawn before the round (:class:`secagg.dp.participants.PreparedNoise`,
        docs/dp.md "Speed"). Used if its offer equals ``params.dp``, otherwise dropped and
        the noise drawn in the round; single-use either way (erased on abort too).
    group_round:
        ``hybrid``/``ckks``: this is a group round of a sharded round (the caller knows: it
        ran the assignment). The group's encrypted sum is the coordinator's; this client
        refuses it (:class:`~secagg.errors.GroupResultRefused`) and ends with the server's
        notice of the contributors (:func:`group_notice`), sending no verdict.

    Raises
    ------
    PolicyViolation
        ``params`` break the policy (the message names the numbers).
    LayoutMismatch
        ``layout`` differs from the round's fingerprint.
    KeyEpochMismatch
        ``key_epoch`` is not the epoch of ``he_context``.
    InputError
        The update, weight or keys cannot be used.
    """

    def __init__(
        self,
        client_id: int,
        identity: IdentityKey,
        params: RoundParams,
        directory: Mapping[int, bytes],
        x: npt.ArrayLike | Any,
        weight: int = 1,
        *,
        rounding_key: bytes | None = None,
        he_context: ckks.SecretContext | None = None,
        policy: ClientPolicy | None = None,
        layout: bytes | None = None,
        key_epoch: bytes | None = None,
        dp_prepared: PreparedNoise | None = None,
        group_round: bool = False,
    ) -> None:
        policy = policy if policy is not None else ClientPolicy()
        policy.check_params(params)  # before anything else: the server chose these
        check_layout(params, layout)
        if (
            key_epoch is not None
            and he_context is not None
            and key_epoch != he_context.epoch.fingerprint
        ):
            raise KeyEpochMismatch(
                f"the round is bound to CKKS key {key_epoch.hex()}, this context is key "
                f"{he_context.epoch.fingerprint.hex()} (epoch {he_context.epoch.epoch})"
            )
        if params.mode not in self.modes:
            raise InputError(
                f"{type(self).__name__} does not run {params.mode.name.lower()} rounds"
            )
        if params.mode is not Mode.MASKED and he_context is None:
            raise InputError("ckks and hybrid rounds need the key holders' CKKS context")
        if directory.get(client_id) != identity.public:
            raise InputError("the directory does not list this client's identity key")
        if any(len(pk) != PUBLIC_KEY_BYTES for pk in directory.values()):
            raise InputError("directory keys must be 32-byte Ed25519 public keys")
        arr: Any
        if kernels.is_device_array(x):
            # A CUDA update stays on its device: the fused mask kernel reads it there.
            size = kernels.check_device_vector(x)  # shape, dtype and NaN, on the device
            arr = x
        else:
            arr = np.asarray(x, dtype=np.float64).reshape(-1)
            size = arr.size
            if np.isnan(arr).any():
                raise InputError("update holds NaN")
        if size != params.dim:
            raise InputError(f"update has {size} values, the round aggregates {params.dim}")
        if isinstance(weight, bool) or not 1 <= int(weight) <= params.quant.max_weight:
            raise InputError(f"weight must be an integer in 1..{params.quant.max_weight}")
        if rounding_key is not None and len(rounding_key) != 32:
            raise InputError("rounding_key must be 32 bytes")
        self._ctx = _Ctx(
            client_id,
            identity,
            params,
            directory,
            arr,
            int(weight),
            rounding_key,
            he_context,
            policy,
        )
        self._ctx.dp_prepared = dp_prepared
        self._ctx.group_round = group_round and params.mode is not Mode.MASKED
        self._state: _State = self._first_state()
        self._started = False

    modes: tuple[Mode, ...] = (Mode.MASKED, Mode.HYBRID)
    """The modes this client runs."""

    def _first_state(self) -> _State:
        return AdvertiseState(self._ctx)

    @property
    def client_id(self) -> int:
        return self._ctx.cid

    @property
    def stage(self) -> Stage:
        return self._state.stage

    @property
    def done(self) -> bool:
        return self.stage in (Stage.COMPLETED, Stage.ABORTED)

    @property
    def result(self) -> ClientResult | None:
        return self._ctx.result

    @property
    def error(self) -> SecAggError | None:
        return self._ctx.error

    @property
    def warnings(self) -> list[str]:
        return self._ctx.warnings

    def start(self, now: float = 0.0) -> list[Message]:
        """The first message (AdvertiseKeys)."""
        if self._started:
            raise UnexpectedMessage("client already started", client_id=self._ctx.cid)
        if self._ctx.he is not None:
            self._ctx.he.require_budget(1)  # hybrid: the result needs one decryption
        self._started = True
        state = self._state
        assert isinstance(state, AdvertiseState)
        msg = state.first_message()
        state.first_message_cached = msg
        return [msg]

    def receive(self, message: Message | bytes, now: float = 0.0) -> list[Message]:
        """Handle one server message; return the messages to send.

        Raises
        ------
        ServerMisbehaviour
            When the server's message is one an honest server never sends; the client
            aborts and sends nothing more.
        RoundAborted
            When the server aborted the round.
        ProtocolViolation
            For a malformed message or one unexpected in this state (the state is kept).
        """
        c = self._ctx
        msg = decode_message(message) if isinstance(message, bytes | bytearray) else message
        if msg.round_id != c.rid:
            raise ProtocolViolation("message belongs to another round", client_id=c.cid)
        if self.done:
            raise UnexpectedMessage(f"the round is {self.stage}", client_id=c.cid)
        if isinstance(msg, Abort):
            self._fail(RoundAborted(msg.stage, msg.reason))
        if not self._started or not isinstance(msg, self._state.accepts):
            raise UnexpectedMessage(
                f"{msg.stage_name} is not expected in client stage {self.stage}",
                client_id=c.cid,
            )
        try:
            self._state, out = self._state.handle(msg)
        except (ServerMisbehaviour, RoundAborted) as exc:
            self._fail(exc)
        return out

    def _fail(self, exc: ServerMisbehaviour | RoundAborted) -> None:
        self._ctx.error = exc
        self._ctx.x = None
        if self._ctx.dp_prepared is not None:  # noise drawn for this round: never reused
            self._ctx.dp_prepared.discard()
        if self._ctx.dp is not None:
            self._ctx.dp.erase()
        self._state = _Final(self._ctx, Stage.ABORTED)
        raise exc
