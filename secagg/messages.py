"""Protocol messages and their fixed byte encoding (no pickle, ever).

Every message starts with the same header::

    magic "SAGG" | version u8 | type u8 | round_id 16 bytes | sender u32 (0 = server)

followed by type-specific fields (big-endian integers, length-prefixed byte strings with a
bound checked before reading). Decoding rejects unknown types, truncation, trailing bytes
and out-of-range values with :class:`~secagg.errors.MalformedMessage`.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from secagg.errors import MalformedMessage
from secagg.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from secagg.params import MAX_CLIENTS, PROTOCOL_VERSION, ROUND_ID_BYTES
from secagg.shamir import SHARE_BYTES
from secagg.wire import Reader, Writer

__all__ = [
    "MAGIC",
    "SEND_ORDER",
    "SESSION_ID_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "SHARE_COMMIT_BYTES",
    "Abort",
    "AdvertiseKeys",
    "AggregateResult",
    "BlameRequest",
    "BlameVerdict",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedInput",
    "EncryptedResult",
    "MaskedInput",
    "Message",
    "NonceReveal",
    "NonceReveals",
    "ResultVerdict",
    "Roster",
    "ShareDelivery",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskShares",
    "advertise_payload",
    "blame_verdict_payload",
    "consistency_payload",
    "decode_message",
    "dp_share_ciphertext_bytes",
    "dp_share_kind",
    "encrypted_input_payload",
    "nonce_commitment",
    "seed_commitment",
    "share_commit_payload",
    "share_commitment",
]

MAGIC = b"SAGG"
SESSION_ID_BYTES = 32
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
"""A share ciphertext carries the self-seed share and the mask-key share."""
SHARE_CIPHERTEXT_BYTES = SHARE_PLAINTEXT_BYTES + 16
"""Plaintext plus the 16-byte AES-GCM tag."""
SHARE_COMMIT_BYTES = 32 + 32 + SIGNATURE_BYTES
"""A dealer's signed commitment to the two shares one holder gets: ``H_seed || H_key || sig``
(two SHA-256 digests and the Ed25519 signature over :func:`share_commit_payload`)."""
DP_SALT_BYTES = 32
"""A DP precompute salt (:data:`secagg.dp.xnoise.PRECOMPUTE_SALT_BYTES`)."""
MAX_TEXT = 1024
SERVER = 0
NONCE_BYTES = 32
"""Graph nonce: 256 bits from :mod:`secrets`, so one honest nonce makes the seed uniform."""


def advertise_payload(
    params_digest: bytes,
    sender: int,
    enc_pk: bytes,
    mask_pk: bytes,
    commit: bytes,
    nonce_commit: bytes = bytes(32),
) -> bytes:
    """Bytes an AdvertiseKeys signature covers: binds the keys and both commitments to the
    round's parameters."""
    return (
        b"secagg/v1/advertise"
        + params_digest
        + sender.to_bytes(4, "big")
        + enc_pk
        + mask_pk
        + commit
        + nonce_commit
    )


def consistency_payload(session_id: bytes, survivors: tuple[int, ...]) -> bytes:
    """Bytes a consistency signature covers: the session and the sorted survivor set."""
    return b"secagg/v1/consistency" + session_id + Writer().ids(survivors).getvalue()


def seed_commitment(params_digest: bytes, sender: int, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed; lets the server check a reconstructed seed."""
    return hashlib.sha256(
        b"secagg/v1/self-seed" + params_digest + sender.to_bytes(4, "big") + seed
    ).digest()


def nonce_commitment(params_digest: bytes, sender: int, nonce: bytes) -> bytes:
    """SHA-256 commitment to a graph nonce (hiding: the nonce has 256 random bits; binding:
    collision resistance). Opened in the reveal_nonces stage, after the roster is fixed."""
    return hashlib.sha256(
        b"secagg/v1/graph-nonce" + params_digest + sender.to_bytes(4, "big") + nonce
    ).digest()


def share_commitment(
    session_id: bytes, dealer: int, holder: int, kind: bytes, share: bytes
) -> bytes:
    """SHA-256 commitment to one Shamir share ``dealer`` deals to ``holder``.

    ``kind`` is ``b"seed"`` (self-mask seed) or ``b"key"`` (mask private key). A share is a
    uniformly random field element (below the threshold), so the digest hides it; anyone who
    later sees the share can check it against the dealer's signed digest.
    """
    return hashlib.sha256(
        b"secagg/v1/share-commit/"
        + kind
        + session_id
        + dealer.to_bytes(4, "big")
        + holder.to_bytes(4, "big")
        + share
    ).digest()


def share_commit_payload(
    session_id: bytes,
    dealer: int,
    holder: int,
    h_seed: bytes,
    h_key: bytes,
    h_dp: bytes = b"",
    dp_salt: bytes = b"",
) -> bytes:
    """Bytes the dealer signs for one holder: its commitments to that holder's two shares,
    and in DP rounds the ``L`` commitments ``h_dp`` to its DP noise-seed shares
    (:func:`dp_share_kind`) and, for noise drawn before the round, its 32-byte precompute
    salt (:func:`secagg.dp.xnoise.component_key`; empty otherwise, so the payload of a
    round without one is unchanged). ``h_dp`` has ``32 L`` bytes, so the split is unique."""
    return (
        b"secagg/v1/share-commits"
        + session_id
        + dealer.to_bytes(4, "big")
        + holder.to_bytes(4, "big")
        + h_seed
        + h_key
        + h_dp
        + dp_salt
    )


def dp_share_kind(component: int) -> bytes:
    """The :func:`share_commitment` ``kind`` of the share of removable noise seed ``k``."""
    return b"dp-noise/" + component.to_bytes(1, "big")


@dataclass(frozen=True)
class Message:
    """Fields common to every message."""

    TYPE: ClassVar[int] = 0
    round_id: bytes
    sender: int

    def _body(self, w: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> Message:
        raise NotImplementedError

    def encode(self) -> bytes:
        w = Writer().raw(MAGIC).u8(PROTOCOL_VERSION).u8(self.TYPE)
        w.fixed(self.round_id, ROUND_ID_BYTES).u32(self.sender)
        self._body(w)
        return w.getvalue()

    @property
    def stage_name(self) -> str:
        return type(self).__name__


# ----------------------------------------------------------------------- client -> server


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Round 0: the client's two X25519 public keys, the commitment to its self-mask seed
    and the commitment to its graph nonce (:func:`nonce_commitment`), signed with its
    identity key. On the wire ``nonce_commit`` comes before ``signature``."""

    TYPE: ClassVar[int] = 1
    enc_pk: bytes
    mask_pk: bytes
    seed_commit: bytes
    signature: bytes
    nonce_commit: bytes = bytes(32)

    def _body(self, w: Writer) -> None:
        w.fixed(self.enc_pk, PUBLIC_KEY_BYTES).fixed(self.mask_pk, PUBLIC_KEY_BYTES)
        w.fixed(self.seed_commit, 32).fixed(self.nonce_commit, 32)
        w.fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> AdvertiseKeys:
        enc_pk, mask_pk = r.fixed(PUBLIC_KEY_BYTES), r.fixed(PUBLIC_KEY_BYTES)
        seed_commit, nonce_commit = r.fixed(32), r.fixed(32)
        return cls(
            round_id, sender, enc_pk, mask_pk, seed_commit, r.fixed(SIGNATURE_BYTES), nonce_commit
        )

    def signed_payload(self, params_digest: bytes) -> bytes:
        return advertise_payload(
            params_digest,
            self.sender,
            self.enc_pk,
            self.mask_pk,
            self.seed_commit,
            self.nonce_commit,
        )


@dataclass(frozen=True)
class NonceReveal(Message):
    """Round 0b (reveal_nonces): the client opens its graph-nonce commitment, after it has
    checked the roster; bound to the session id (which covers every commitment)."""

    TYPE: ClassVar[int] = 7
    session_id: bytes
    nonce: bytes

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).fixed(self.nonce, NONCE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> NonceReveal:
        return cls(round_id, sender, r.fixed(SESSION_ID_BYTES), r.fixed(NONCE_BYTES))


def _word_bytes(words: npt.NDArray[np.uint64]) -> memoryview:
    """The little-endian bytes of ``words``: a view of the array when it is contiguous and
    little-endian already (no copy), else of a converted copy."""
    return np.ascontiguousarray(words, dtype="<u8").data.cast("B")


def _read_words(view: memoryview) -> npt.NDArray[np.uint64]:
    """Little-endian uint64 words from ``view``: a read-only view of an immutable ``bytes``
    encoding on a little-endian host (no 8 MB copy and its page faults for a 10^6-value
    aggregate), a private copy of anything else (a buffer the caller could change later)."""
    words = np.frombuffer(view, dtype="<u8")
    if isinstance(view.obj, bytes) and words.dtype == np.uint64:
        return words
    return words.astype(np.uint64)


def _pairs(w: Writer, pairs: tuple[tuple[int, bytes], ...], size: int) -> None:
    """``count u32 | (peer u32 | blob[size])*``, packed in one C-level pass."""
    if any(len(blob) != size for _, blob in pairs):
        raise ValueError(f"expected {size}-byte entries")
    w.u32(len(pairs))
    flat = itertools.chain.from_iterable((peer, bytes(blob)) for peer, blob in pairs)
    w.raw(struct.pack(">" + f"I{size}s" * len(pairs), *flat))


def _read_pairs(r: Reader, size: int) -> tuple[tuple[int, bytes], ...]:
    """Inverse of :func:`_pairs` (one ``struct.iter_unpack`` over the records)."""
    n = r.u32()
    if n > MAX_CLIENTS or n * (4 + size) > r.remaining:
        raise MalformedMessage(f"list of {n} entries does not fit the message")
    return tuple(struct.iter_unpack(f">I{size}s", r.view(n * (4 + size))))


MAX_DP_COMPONENTS = 255
"""Most removable DP noise seeds one client shares (a u8 on the wire)."""


def dp_share_ciphertext_bytes(components: int) -> int:
    """A DP share ciphertext: ``components`` Shamir shares and the AES-GCM tag."""
    return components * SHARE_BYTES + 16


def _dp_section(
    w: Writer,
    components: int,
    shares: tuple[tuple[int, bytes], ...],
    commitments: tuple[tuple[int, bytes], ...],
) -> None:
    """Trailing DP part of ShareKeys / ShareDelivery: absent (no byte) without DP, so the
    encoding of a round without DP is unchanged."""
    if components == 0:
        if shares or commitments:
            raise ValueError("DP shares need their component count")
        return
    w.u8(components)
    _pairs(w, shares, dp_share_ciphertext_bytes(components))
    _pairs(w, commitments, 32 * components)


def _read_dp_section(
    r: Reader,
) -> tuple[int, tuple[tuple[int, bytes], ...], tuple[tuple[int, bytes], ...]]:
    if not r.remaining:
        return 0, (), ()
    components = r.u8()
    if components == 0:
        raise MalformedMessage("a DP share section with no components")
    shares = _read_pairs(r, dp_share_ciphertext_bytes(components))
    return components, shares, _read_pairs(r, 32 * components)


@dataclass(frozen=True)
class ShareKeys(Message):
    """Round 1: one encrypted share bundle per neighbour, ``(recipient, ciphertext)``, and
    the dealer's signed share commitments for every holder ``N(u) ∪ {u}``,
    ``(holder, H_seed || H_key || sig)`` (:data:`SHARE_COMMIT_BYTES`).

    DP rounds add the shares of the ``L = dp_components`` removable noise seeds: one more
    ciphertext per neighbour (``dp_shares``, under its own pairwise key) and, per holder,
    the ``L`` share commitments ``H_dp_0 || .. || H_dp_(L-1)`` (``dp_commitments``), which
    the holder's ``sig`` also covers (:func:`share_commit_payload`). A client whose noise
    was drawn before the round adds its precompute salt ``dp_salt`` (32 bytes after the DP
    section; absent otherwise), also covered by every ``sig``."""

    TYPE: ClassVar[int] = 2
    session_id: bytes
    shares: tuple[tuple[int, bytes], ...]
    commitments: tuple[tuple[int, bytes], ...] = ()
    dp_components: int = 0
    dp_shares: tuple[tuple[int, bytes], ...] = ()
    dp_commitments: tuple[tuple[int, bytes], ...] = ()
    dp_salt: bytes = b""

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES)
        _pairs(w, self.shares, SHARE_CIPHERTEXT_BYTES)
        _pairs(w, self.commitments, SHARE_COMMIT_BYTES)
        _dp_section(w, self.dp_components, self.dp_shares, self.dp_commitments)
        if self.dp_salt:
            if not self.dp_components:
                raise ValueError("a DP salt needs DP shares")
            w.fixed(self.dp_salt, DP_SALT_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> ShareKeys:
        sid = r.fixed(SESSION_ID_BYTES)
        shares = _read_pairs(r, SHARE_CIPHERTEXT_BYTES)
        commits = _read_pairs(r, SHARE_COMMIT_BYTES)
        dp = _read_dp_section(r)
        salt = r.fixed(DP_SALT_BYTES) if r.remaining else b""
        return cls(round_id, sender, sid, shares, commits, *dp, salt)


@dataclass(frozen=True, eq=False)
class MaskedInput(Message):
    """Round 2: the masked, packed input ``y_u`` as uint64 words."""

    TYPE: ClassVar[int] = 3
    session_id: bytes
    words: npt.NDArray[np.uint64]

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).u64(self.words.size)
        w.borrow(_word_bytes(self.words))

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> MaskedInput:
        session = r.fixed(SESSION_ID_BYTES)
        n = r.u64()
        if 8 * n != r.remaining:
            raise MalformedMessage(f"masked input announces {n} words, carries {r.remaining} bytes")
        words = np.frombuffer(r.view(8 * n), dtype="<u8").astype(np.uint64)
        return cls(round_id, sender, session, words)


@dataclass(frozen=True)
class ConsistencySignature(Message):
    """Round 3: the client's signature over the survivor set it was shown."""

    TYPE: ClassVar[int] = 4
    session_id: bytes
    signature: bytes

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> ConsistencySignature:
        return cls(round_id, sender, r.fixed(SESSION_ID_BYTES), r.fixed(SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskShares(Message):
    """Round 4: self-seed shares of survivors and mask-key shares of dropped clients; in DP
    rounds also ``dp_shares``, ``(owner, component, share)`` of the survivors' removable
    noise seeds (a trailing section, absent without DP)."""

    TYPE: ClassVar[int] = 5
    session_id: bytes
    seed_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]
    dp_shares: tuple[tuple[int, int, bytes], ...] = ()

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES)
        _pairs(w, self.seed_shares, SHARE_BYTES)
        _pairs(w, self.key_shares, SHARE_BYTES)
        if self.dp_shares:
            w.u32(len(self.dp_shares))
            for owner, k, share in self.dp_shares:
                w.u32(owner).u8(k).fixed(share, SHARE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> UnmaskShares:
        sid = r.fixed(SESSION_ID_BYTES)
        seeds, keys = _read_pairs(r, SHARE_BYTES), _read_pairs(r, SHARE_BYTES)
        dp: tuple[tuple[int, int, bytes], ...] = ()
        if r.remaining:
            n = r.u32()
            if n == 0 or n * (5 + SHARE_BYTES) > r.remaining:
                raise MalformedMessage(f"DP share list of {n} entries does not fit the message")
            dp = tuple((r.u32(), r.u8(), r.fixed(SHARE_BYTES)) for _ in range(n))
        return cls(round_id, sender, sid, seeds, keys, dp)


MAX_CIPHERTEXTS = 1 << 16
"""Bound on the ciphertexts in one encrypted vector (10^9 parameters at N = 16384)."""
MAX_CIPHERTEXT_BYTES = 1 << 24
"""Bound on one serialized CKKS ciphertext (N = 32768 with the largest modulus is ~7 MiB)."""


def _blobs(w: Writer, blobs: tuple[bytes, ...]) -> None:
    w.u32(len(blobs))
    for b in blobs:
        w.var(b)


def _read_blobs(r: Reader) -> tuple[bytes, ...]:
    n = r.u32()
    if n > MAX_CIPHERTEXTS or 4 * n > r.remaining:
        raise MalformedMessage(f"list of {n} ciphertexts does not fit the message")
    return tuple(r.var(MAX_CIPHERTEXT_BYTES) for _ in range(n))


def encrypted_input_payload(
    session_id: bytes, sender: int, ciphertexts: tuple[bytes, ...]
) -> bytes:
    """Bytes an EncryptedInput signature covers: session, sender and every ciphertext."""
    h = hashlib.sha256(b"secagg/v1/encrypted-input" + session_id + sender.to_bytes(4, "big"))
    for c in ciphertexts:
        h.update(len(c).to_bytes(4, "big") + c)
    return h.digest()


@dataclass(frozen=True)
class EncryptedInput(Message):
    """ckks and hybrid modes: the client's CKKS ciphertexts (of masked slots in hybrid),
    signed with its identity key so the server can attribute every contribution."""

    TYPE: ClassVar[int] = 6
    session_id: bytes
    ciphertexts: tuple[bytes, ...]
    signature: bytes

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES)
        _blobs(w, self.ciphertexts)
        w.fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> EncryptedInput:
        return cls(
            round_id, sender, r.fixed(SESSION_ID_BYTES), _read_blobs(r), r.fixed(SIGNATURE_BYTES)
        )


def blame_verdict_payload(
    session_id: bytes,
    sender: int,
    checked: tuple[int, ...],
    blamed: tuple[tuple[int, str], ...],
) -> bytes:
    """Bytes a :class:`BlameVerdict` signature covers: session, key holder, the senders it
    checked and each blamed sender with its reason. A verdict is evidence its signer cannot
    disown (``docs/ckks.md``, "Blame in a live hybrid round")."""
    h = hashlib.sha256(b"secagg/v1/blame-verdict" + session_id + sender.to_bytes(4, "big"))
    h.update(len(checked).to_bytes(4, "big") + b"".join(c.to_bytes(4, "big") for c in checked))
    for cid, reason in blamed:
        text = reason.encode()
        h.update(cid.to_bytes(4, "big") + len(text).to_bytes(4, "big") + text)
    return h.digest()


@dataclass(frozen=True)
class ResultVerdict(Message):
    """hybrid mode, after the encrypted result: whether it decrypted to in-range lanes.

    ``ok = False`` asks the server to trace the bad upload (:mod:`secagg.rounds.blame`).
    """

    TYPE: ClassVar[int] = 10
    session_id: bytes
    ok: bool

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).u8(1 if self.ok else 0)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> ResultVerdict:
        session = r.fixed(SESSION_ID_BYTES)
        flag = r.u8()
        if flag > 1:
            raise MalformedMessage(f"result verdict flag must be 0 or 1, got {flag}")
        return cls(round_id, sender, session, flag == 1)


@dataclass(frozen=True)
class BlameVerdict(Message):
    """hybrid mode: a key holder's signed verdict on the uploads it was asked to check
    (``blamed``: sender and the fixed reason text, a subset of ``checked``)."""

    TYPE: ClassVar[int] = 11
    session_id: bytes
    checked: tuple[int, ...]
    blamed: tuple[tuple[int, str], ...]
    signature: bytes

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).ids(self.checked)
        w.u32(len(self.blamed))
        for cid, reason in self.blamed:
            w.u32(cid).var(reason.encode()[:MAX_TEXT])
        w.fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> BlameVerdict:
        session = r.fixed(SESSION_ID_BYTES)
        checked = r.ids(MAX_CLIENTS)
        n = r.u32()
        if n > len(checked) or 8 * n > r.remaining:
            raise MalformedMessage(f"verdict blames {n} of {len(checked)} checked uploads")
        blamed = []
        for _ in range(n):
            cid = r.u32()
            try:
                blamed.append((cid, r.var(MAX_TEXT).decode()))
            except UnicodeDecodeError:
                raise MalformedMessage("blame reason is not UTF-8") from None
        return cls(round_id, sender, session, checked, tuple(blamed), r.fixed(SIGNATURE_BYTES))

    def signed_payload(self) -> bytes:
        return blame_verdict_payload(self.session_id, self.sender, self.checked, self.blamed)


# ----------------------------------------------------------------------- server -> client


@dataclass(frozen=True)
class Roster(Message):
    """End of round 0: every advertised key set, as the clients signed them."""

    TYPE: ClassVar[int] = 16
    entries: tuple[AdvertiseKeys, ...]

    def _body(self, w: Writer) -> None:
        w.u32(len(self.entries))
        for e in self.entries:
            w.u32(e.sender)
            e._body(w)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> Roster:
        n = r.u32()
        entry = 4 + 4 * 32 + SIGNATURE_BYTES
        if n > MAX_CLIENTS or n * entry > r.remaining:
            raise MalformedMessage(f"roster of {n} entries does not fit the message")
        entries = []
        for _ in range(n):
            cid = r.u32()
            entries.append(AdvertiseKeys._decode_body(r, round_id, cid))
        return cls(round_id, sender, tuple(entries))


@dataclass(frozen=True)
class NonceReveals(Message):
    """End of round 0b: every roster member's graph nonce, ``(client, nonce)`` in id order.
    Clients accept it only if it names exactly the roster."""

    TYPE: ClassVar[int] = 23
    session_id: bytes
    nonces: tuple[tuple[int, bytes], ...]

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES)
        _pairs(w, self.nonces, NONCE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> NonceReveals:
        return cls(round_id, sender, r.fixed(SESSION_ID_BYTES), _read_pairs(r, NONCE_BYTES))


@dataclass(frozen=True)
class ShareDelivery(Message):
    """End of round 1: the share ciphertexts addressed to this client, by sender, and each
    sender's signed commitments to the shares inside, ``(sender, H_seed || H_key || sig)``;
    in DP rounds also each sender's DP share ciphertext and DP share commitments, and the
    precompute salts of the senders that sent one (``(sender, salt)``, a trailing list
    present only when non-empty)."""

    TYPE: ClassVar[int] = 17
    session_id: bytes
    shares: tuple[tuple[int, bytes], ...]
    commitments: tuple[tuple[int, bytes], ...] = ()
    dp_components: int = 0
    dp_shares: tuple[tuple[int, bytes], ...] = ()
    dp_commitments: tuple[tuple[int, bytes], ...] = ()
    dp_salts: tuple[tuple[int, bytes], ...] = ()

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES)
        _pairs(w, self.shares, SHARE_CIPHERTEXT_BYTES)
        _pairs(w, self.commitments, SHARE_COMMIT_BYTES)
        _dp_section(w, self.dp_components, self.dp_shares, self.dp_commitments)
        if self.dp_salts:
            if not self.dp_components:
                raise ValueError("DP salts need DP shares")
            _pairs(w, self.dp_salts, DP_SALT_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> ShareDelivery:
        sid = r.fixed(SESSION_ID_BYTES)
        shares = _read_pairs(r, SHARE_CIPHERTEXT_BYTES)
        commits = _read_pairs(r, SHARE_COMMIT_BYTES)
        dp = _read_dp_section(r)
        salts = _read_pairs(r, DP_SALT_BYTES) if r.remaining else ()
        return cls(round_id, sender, sid, shares, commits, *dp, salts)


@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """End of round 2: the set of clients whose masked input the server holds."""

    TYPE: ClassVar[int] = 18
    session_id: bytes
    survivors: tuple[int, ...]

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).ids(self.survivors)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> ConsistencyRequest:
        return cls(round_id, sender, r.fixed(SESSION_ID_BYTES), r.ids(MAX_CLIENTS))


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """End of round 3: survivors, dropped clients, and the survivors' signatures."""

    TYPE: ClassVar[int] = 19
    session_id: bytes
    alive: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...]

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).ids(self.alive).ids(self.dropped)
        _pairs(w, self.signatures, SIGNATURE_BYTES)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> UnmaskRequest:
        return cls(
            round_id,
            sender,
            r.fixed(SESSION_ID_BYTES),
            r.ids(MAX_CLIENTS),
            r.ids(MAX_CLIENTS),
            _read_pairs(r, SIGNATURE_BYTES),
        )


@dataclass(frozen=True, eq=False)
class AggregateResult(Message):
    """The unmasked aggregate, still packed (lane sums in uint64 words), for the contributors."""

    TYPE: ClassVar[int] = 20
    session_id: bytes
    contributors: tuple[int, ...]
    words: npt.NDArray[np.uint64]

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).ids(self.contributors).u64(self.words.size)
        w.borrow(_word_bytes(self.words))

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> AggregateResult:
        session = r.fixed(SESSION_ID_BYTES)
        contributors = r.ids(MAX_CLIENTS)
        n = r.u64()
        if 8 * n != r.remaining:
            raise MalformedMessage(f"result announces {n} words, carries {r.remaining} bytes")
        return cls(round_id, sender, session, contributors, _read_words(r.view(8 * n)))


@dataclass(frozen=True)
class EncryptedResult(Message):
    """ckks and hybrid modes: the encrypted sum, for the key holders to decrypt.

    Hybrid DP rounds add ``dp_removal``: the survivors' removable noise components, summed
    mod ``2^b`` and packed like the DP upload (little-endian uint64 words), which the key
    holders subtract after decrypting (a trailing section, absent without DP)."""

    TYPE: ClassVar[int] = 22
    session_id: bytes
    contributors: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]
    dp_removal: bytes = b""

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).ids(self.contributors)
        _blobs(w, self.ciphertexts)
        if self.dp_removal:
            w.u64(len(self.dp_removal)).raw(self.dp_removal)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> EncryptedResult:
        sid, ids, cts = r.fixed(SESSION_ID_BYTES), r.ids(MAX_CLIENTS), _read_blobs(r)
        removal = b""
        if r.remaining:
            n = r.u64()
            if n == 0 or n % 8 or n != r.remaining:
                raise MalformedMessage(f"DP removal of {n} bytes does not fit the message")
            removal = r.fixed(n)
        return cls(round_id, sender, sid, ids, cts, removal)


MAX_BLAME_UPLOADS = 64
"""Codec bound on the uploads in one :class:`BlameRequest` (a client's policy allows far
fewer, :attr:`secagg.policy.ClientPolicy.max_blame_checks`)."""


@dataclass(frozen=True)
class BlameRequest(Message):
    """hybrid mode: signed uploads, exactly as their senders sent them, for one key holder
    to check after the sum failed to decrypt (:func:`secagg.he_blame.check_uploads`)."""

    TYPE: ClassVar[int] = 26
    session_id: bytes
    uploads: tuple[EncryptedInput, ...]

    def _body(self, w: Writer) -> None:
        w.fixed(self.session_id, SESSION_ID_BYTES).u32(len(self.uploads))
        for up in self.uploads:
            data = up.encode()
            w.u32(len(data)).raw(data)

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> BlameRequest:
        session = r.fixed(SESSION_ID_BYTES)
        n = r.u32()
        if n > MAX_BLAME_UPLOADS or 4 * n > r.remaining:
            raise MalformedMessage(f"blame request of {n} uploads does not fit the message")
        uploads = []
        for _ in range(n):
            size = r.u32()
            if size > r.remaining:
                raise MalformedMessage(f"upload of {size} bytes does not fit the message")
            up = decode_message(r.view(size))
            if not isinstance(up, EncryptedInput) or up.round_id != round_id:
                raise MalformedMessage(
                    "blame request holds something other than this round's uploads"
                )
            uploads.append(up)
        return cls(round_id, sender, session, tuple(uploads))


@dataclass(frozen=True)
class Abort(Message):
    """The round ended without a result; ``stage`` names where."""

    TYPE: ClassVar[int] = 21
    stage: str
    reason: str

    def _body(self, w: Writer) -> None:
        w.var(self.stage.encode()[:MAX_TEXT]).var(self.reason.encode()[:MAX_TEXT])

    @classmethod
    def _decode_body(cls, r: Reader, round_id: bytes, sender: int) -> Abort:
        try:
            stage = r.var(MAX_TEXT).decode()
            reason = r.var(MAX_TEXT).decode()
        except UnicodeDecodeError:
            raise MalformedMessage("abort text is not UTF-8") from None
        return cls(round_id, sender, stage, reason)


_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        AdvertiseKeys,
        ShareKeys,
        MaskedInput,
        ConsistencySignature,
        UnmaskShares,
        Roster,
        ShareDelivery,
        ConsistencyRequest,
        UnmaskRequest,
        AggregateResult,
        Abort,
        EncryptedInput,
        EncryptedResult,
        NonceReveal,
        NonceReveals,
        ResultVerdict,
        BlameVerdict,
        BlameRequest,
    )
}
CLIENT_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 10, 11})
SEND_ORDER: dict[int, int] = {1: 0, 7: 1, 2: 2, 3: 3, 6: 3, 4: 4, 5: 5, 10: 6, 11: 7}
"""Client message type -> position of the stage it is sent in (advertise_keys,
reveal_nonces, share_keys, masked/encrypted input, consistency, unmasking, result check,
blame): type numbers are not in stage order."""


def decode_message(data: bytes | memoryview) -> Message:
    """Decode any message.

    Raises
    ------
    MalformedMessage
        For bad magic or version, an unknown type, truncation, trailing bytes or
        out-of-range fields.
    """
    r = Reader(data)
    if r.fixed(4) != MAGIC:
        raise MalformedMessage("not a secagg message (bad magic)")
    if r.u8() != PROTOCOL_VERSION:
        raise MalformedMessage("unsupported protocol version")
    kind = r.u8()
    cls = _TYPES.get(kind)
    if cls is None:
        raise MalformedMessage(f"unknown message type {kind}")
    round_id = r.fixed(ROUND_ID_BYTES)
    sender = r.u32()
    is_client = kind in CLIENT_TYPES
    if is_client == (sender == SERVER):
        raise MalformedMessage("sender id does not match the message direction")
    msg = cls._decode_body(r, round_id, sender)
    r.end()
    return msg
