"""Known-answer and negative tests for the primitive layer: ``secagg.keys`` and ``secagg.prg``.

Every expected value in ``tests/vectors/*.json`` is copied from the document named in that
file's ``source`` field (RFC 7748, RFC 8032, RFC 5869, the GCM specification); see
``tests/vectors/README.md``. The ChaCha20 values below are from RFC 8439 and cited inline.

Where our API cannot take a vector's inputs (an arbitrary X25519 u-coordinate, an arbitrary
HKDF info string, an arbitrary GCM IV), the vector goes through pycryptodome directly and our
wrapper is then checked against pycryptodome (or, for HKDF and X25519, against a small
reference written here from the RFC text and itself checked against the same vectors).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
from pathlib import Path
from typing import Any

import Crypto
import numpy as np
import pytest
from Crypto.Cipher import AES, ChaCha20
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.Signature import eddsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from secagg import keys as keys_module
from secagg.errors import ConfigurationError, CryptoError, DecryptionError, InvalidSignature
from secagg.keys import (
    AEAD_NONCE,
    AEAD_TAG_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    AgreementKey,
    IdentityKey,
    aead_decrypt,
    aead_encrypt,
    check_identity_key,
    random_seed,
    verify_signature,
    x25519_public,
)
from secagg.prg import (
    KEY_BYTES,
    MAX_STREAM_BYTES,
    Purpose,
    derive_key,
    keystream_bytes,
    keystream_u32,
    keystream_u64,
    nonce_for,
)

VECTORS = Path(__file__).parent / "vectors"
VECTOR_FILES = (
    "x25519_rfc7748.json",
    "ed25519_rfc8032.json",
    "hkdf_rfc5869.json",
    "aesgcm.json",
)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


X25519_KAT = _load("x25519_rfc7748.json")
ED25519_KAT = _load("ed25519_rfc8032.json")
HKDF_KAT = _load("hkdf_rfc5869.json")
GCM_KAT = _load("aesgcm.json")

SMALL_ORDER = [h(p["u"]) for p in X25519_KAT["small_order"]["points"]]
SMALL_ORDER_IDS = [p["label"] for p in X25519_KAT["small_order"]["points"]]


def test_every_vector_file_names_its_source_and_is_listed_in_the_readme() -> None:
    readme = (VECTORS / "README.md").read_text(encoding="utf-8")
    for name in VECTOR_FILES:
        data = _load(name)
        assert data["source"].strip(), name
        assert name in readme, name


# --- X25519 (RFC 7748) ----------------------------------------------------------------------

_P25519 = 2**255 - 19


def _x25519_pycryptodome(scalar: bytes, u: bytes) -> bytes:
    shared = key_agreement(
        static_priv=import_x25519_private_key(scalar),
        static_pub=import_x25519_public_key(u),
        kdf=lambda z: z,
    )
    assert isinstance(shared, bytes)
    return shared


def _x25519_reference(scalar: bytes, u: bytes) -> bytes:
    """RFC 7748 section 5, transcribed: clamp, mask the top bit of u, Montgomery ladder.

    Slow and not constant time; used only to check the small-order list below (pycryptodome
    refuses those points at import, so it cannot show that they give an all-zero output).
    """
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    x1 = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = x2 + z2, x2 - z2
        aa, bb = a * a % _P25519, b * b % _P25519
        e = aa - bb
        c, d = x3 + z3, x3 - z3
        da, cb = d * a % _P25519, c * b % _P25519
        x3 = (da + cb) ** 2 % _P25519
        z3 = x1 * (da - cb) ** 2 % _P25519
        x2 = aa * bb % _P25519
        z2 = e * (aa + 121665 * e) % _P25519
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, _P25519 - 2, _P25519) % _P25519).to_bytes(32, "little")


@pytest.mark.parametrize(
    "vec", X25519_KAT["scalar_mult"], ids=[v["name"] for v in X25519_KAT["scalar_mult"]]
)
def test_rfc7748_5_2_scalar_mult_pycryptodome(vec: dict[str, str]) -> None:
    assert _x25519_pycryptodome(h(vec["scalar"]), h(vec["u"])) == h(vec["output"])


@pytest.mark.parametrize(
    "vec", X25519_KAT["scalar_mult"], ids=[v["name"] for v in X25519_KAT["scalar_mult"]]
)
def test_rfc7748_5_2_scalar_mult_reference_ladder(vec: dict[str, str]) -> None:
    assert _x25519_reference(h(vec["scalar"]), h(vec["u"])) == h(vec["output"])


def test_rfc7748_top_bit_of_u_is_ignored() -> None:
    vec = X25519_KAT["scalar_mult"][1]
    u = h(vec["u"])
    assert u[31] & 0x80, "the RFC's second vector has the top bit set"
    masked = u[:31] + bytes([u[31] & 0x7F])
    assert _x25519_pycryptodome(h(vec["scalar"]), masked) == h(vec["output"])


def test_rfc7748_5_2_iterated() -> None:
    it = X25519_KAT["iterated"]
    expected = {r["iterations"]: h(r["k"]) for r in it["results"]}
    k = u = h(it["start"])
    for i in range(1, max(expected) + 1):
        k, u = _x25519_pycryptodome(k, u), k
        if i in expected:
            assert k == expected[i], f"after {i} iterations"


def test_rfc7748_6_1_through_our_api() -> None:
    dh = X25519_KAT["diffie_hellman"]
    alice = AgreementKey(private=h(dh["alice_private"]))
    bob = AgreementKey(private=h(dh["bob_private"]))
    assert alice.public == h(dh["alice_public"])
    assert bob.public == h(dh["bob_public"])
    assert x25519_public(h(dh["alice_private"])) == h(dh["alice_public"])
    assert x25519_public(h(dh["bob_private"])) == h(dh["bob_public"])
    assert alice.agree(bob.public) == h(dh["shared"])
    assert bob.agree(alice.public) == h(dh["shared"])
    assert alice.private_bytes == h(dh["alice_private"])


def test_agree_is_symmetric_for_fresh_keys() -> None:
    a, b = AgreementKey(), AgreementKey()
    assert a.agree(b.public) == b.agree(a.public)
    assert len(a.agree(b.public)) == 32


@pytest.mark.parametrize("u", SMALL_ORDER, ids=SMALL_ORDER_IDS)
def test_small_order_list_really_gives_all_zero_output(u: bytes) -> None:
    rng = random.Random(7748)
    for _ in range(3):
        scalar = rng.randbytes(32)
        assert _x25519_reference(scalar, u) == bytes(32)
        assert _x25519_reference(scalar, u[:31] + bytes([u[31] | 0x80])) == bytes(32)


@pytest.mark.parametrize("top_bit", [False, True], ids=["as-listed", "top-bit-set"])
@pytest.mark.parametrize("u", SMALL_ORDER, ids=SMALL_ORDER_IDS)
def test_agree_rejects_small_order_peer_key(u: bytes, top_bit: bool) -> None:
    if top_bit:
        u = u[:31] + bytes([u[31] | 0x80])
    key = AgreementKey(private=h(X25519_KAT["diffie_hellman"]["alice_private"]))
    with pytest.raises(CryptoError):
        key.agree(u)
    with pytest.raises(CryptoError):
        AgreementKey().agree(u)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_agree_rejects_wrong_length_peer_key(length: int) -> None:
    with pytest.raises(CryptoError):
        AgreementKey().agree(b"\x09" * length)


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_agreement_key_rejects_wrong_length_private(length: int) -> None:
    with pytest.raises(ConfigurationError):
        AgreementKey(private=bytes(length))
    with pytest.raises(ConfigurationError):
        x25519_public(bytes(length))


# --- Ed25519 (RFC 8032) ---------------------------------------------------------------------

ED_VECTORS = ED25519_KAT["vectors"]
ED_IDS = [v["name"] for v in ED_VECTORS]


@pytest.mark.parametrize("vec", ED_VECTORS, ids=ED_IDS)
def test_rfc8032_7_1_through_our_api(vec: dict[str, str]) -> None:
    key = IdentityKey(private=h(vec["secret_key"]))
    assert key.public == h(vec["public_key"])
    assert key.private_bytes == h(vec["secret_key"])
    assert key.sign(h(vec["message"])) == h(vec["signature"])
    verify_signature(h(vec["public_key"]), h(vec["message"]), h(vec["signature"]))


def test_rfc8032_sha_abc_message_is_sha512_of_abc() -> None:
    vec = next(v for v in ED_VECTORS if v["name"] == "TEST SHA(abc)")
    assert h(vec["message"]) == hashlib.sha512(b"abc").digest()


@pytest.mark.parametrize("vec", ED_VECTORS, ids=ED_IDS)
def test_signature_with_any_bit_flipped_is_rejected(vec: dict[str, str]) -> None:
    pk, msg, sig = h(vec["public_key"]), h(vec["message"]), h(vec["signature"])
    for bit in range(8 * SIGNATURE_BYTES):
        with pytest.raises(InvalidSignature):
            verify_signature(pk, msg, _flip(sig, bit))


@pytest.mark.parametrize("vec", ED_VECTORS, ids=ED_IDS)
def test_signature_over_another_message_is_rejected(vec: dict[str, str]) -> None:
    pk, msg, sig = h(vec["public_key"]), h(vec["message"]), h(vec["signature"])
    others = [msg + b"\x00", msg[:-1], b"x" + msg]
    others += [_flip(msg, bit) for bit in range(min(8 * len(msg), 64))]
    for other in others:
        if other == msg:
            continue
        with pytest.raises(InvalidSignature):
            verify_signature(pk, other, sig)


def test_signature_under_another_key_is_rejected() -> None:
    for i, vec in enumerate(ED_VECTORS):
        other = ED_VECTORS[(i + 1) % len(ED_VECTORS)]
        with pytest.raises(InvalidSignature):
            verify_signature(h(other["public_key"]), h(vec["message"]), h(vec["signature"]))
    signer, stranger = IdentityKey(), IdentityKey()
    sig = signer.sign(b"payload")
    verify_signature(signer.public, b"payload", sig)
    with pytest.raises(InvalidSignature):
        verify_signature(stranger.public, b"payload", sig)


@pytest.mark.parametrize(
    ("pk_len", "sig_len"),
    [(0, 64), (31, 64), (33, 64), (64, 64), (32, 0), (32, 63), (32, 65), (32, 128), (0, 0)],
)
def test_malformed_lengths_are_rejected(pk_len: int, sig_len: int) -> None:
    vec = ED_VECTORS[0]
    pk = (h(vec["public_key"]) * 3)[:pk_len]
    sig = (h(vec["signature"]) * 3)[:sig_len]
    with pytest.raises(InvalidSignature) as info:
        verify_signature(pk, h(vec["message"]), sig, client_id=42)
    assert info.value.client_id == 42


@pytest.mark.parametrize(
    "pk",
    [
        # y = p + 1: a non-canonical encoding, which RFC 8032 section 5.1.3 says to reject.
        "ee" + "ff" * 30 + "7f",
        # y = 1 with the x sign bit set: x would be 0, which has no negative (section 5.1.3).
        "01" + "00" * 30 + "80",
    ],
)
def test_invalid_public_key_encoding_is_rejected(pk: str) -> None:
    with pytest.raises(InvalidSignature):
        verify_signature(h(pk), b"", h(ED_VECTORS[0]["signature"]), client_id=3)


def test_non_canonical_s_is_rejected() -> None:
    """S + L verifies the same equation; RFC 8032 section 5.1.7 requires S < L."""
    vec = ED_VECTORS[1]
    sig = h(vec["signature"])
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(sig[32:], "little") + order
    with pytest.raises(InvalidSignature):
        verify_signature(
            h(vec["public_key"]), h(vec["message"]), sig[:32] + s.to_bytes(32, "little")
        )


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_identity_key_rejects_wrong_length_private(length: int) -> None:
    with pytest.raises(ConfigurationError):
        IdentityKey(private=bytes(length))


def test_small_order_identity_key_does_not_verify_everything() -> None:
    identity_point = b"\x01" + bytes(31)
    with pytest.raises(InvalidSignature):
        verify_signature(identity_point, b"any message at all", identity_point + bytes(32))


# --- key hygiene ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AgreementKey, IdentityKey])
def test_repr_shows_public_key_only(cls: type[AgreementKey] | type[IdentityKey]) -> None:
    key = cls()
    private = key.private_bytes
    for text in (repr(key), str(key)):
        assert private.hex() not in text
        assert private.hex().upper() not in text
        assert repr(private) not in text
        assert key.public.hex() in text


@pytest.mark.parametrize("cls", [AgreementKey, IdentityKey])
def test_fresh_keys_differ(cls: type[AgreementKey] | type[IdentityKey]) -> None:
    a, b = cls(), cls()
    assert a.private_bytes != b.private_bytes
    assert a.public != b.public
    assert len(a.public) == PUBLIC_KEY_BYTES


def test_random_seeds_differ() -> None:
    seeds = {random_seed() for _ in range(16)}
    assert len(seeds) == 16
    assert all(len(s) == 32 for s in seeds)


# --- AES-256-GCM ----------------------------------------------------------------------------

GCM_VECTORS = GCM_KAT["vectors"]
GCM_IDS = [v["name"] for v in GCM_VECTORS]


@pytest.mark.parametrize("vec", GCM_VECTORS, ids=GCM_IDS)
def test_gcm_spec_vectors_pycryptodome(vec: dict[str, str]) -> None:
    key, iv, aad = h(vec["key"]), h(vec["iv"]), h(vec["aad"])
    assert len(key) == 32 and len(iv) == 12
    enc = AES.new(key, AES.MODE_GCM, nonce=iv, mac_len=16)
    enc.update(aad)
    ct, tag = enc.encrypt_and_digest(h(vec["plaintext"]))
    assert (ct, tag) == (h(vec["ciphertext"]), h(vec["tag"]))
    dec = AES.new(key, AES.MODE_GCM, nonce=iv, mac_len=16)
    dec.update(aad)
    assert dec.decrypt_and_verify(h(vec["ciphertext"]), h(vec["tag"])) == h(vec["plaintext"])


@pytest.mark.parametrize(
    "vec",
    [v for v in GCM_VECTORS if h(v["iv"]) == bytes(12)],
    ids=[v["name"] for v in GCM_VECTORS if h(v["iv"]) == bytes(12)],
)
def test_gcm_zero_iv_vectors_through_our_wrapper(vec: dict[str, str]) -> None:
    """Test cases 13 and 14 use the all-zero IV, which is exactly our fixed nonce."""
    assert len(AEAD_NONCE) == 12 and not any(AEAD_NONCE)
    assert AEAD_TAG_BYTES == 16
    sealed = aead_encrypt(h(vec["key"]), h(vec["plaintext"]), h(vec["aad"]))
    assert sealed == h(vec["ciphertext"]) + h(vec["tag"])
    assert aead_decrypt(h(vec["key"]), sealed, h(vec["aad"])) == h(vec["plaintext"])


def test_wrapper_matches_pycryptodome_with_zero_nonce() -> None:
    vec = GCM_VECTORS[-1]
    key, pt, aad = h(vec["key"]), h(vec["plaintext"]), h(vec["aad"])
    ref = AES.new(key, AES.MODE_GCM, nonce=bytes(12), mac_len=16)
    ref.update(aad)
    ct, tag = ref.encrypt_and_digest(pt)
    assert aead_encrypt(key, pt, aad) == ct + tag


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 64, 1000])
def test_aead_round_trip(size: int) -> None:
    key = random_seed()
    pt = random.Random(size).randbytes(size)
    sealed = aead_encrypt(key, pt, b"ad")
    assert len(sealed) == size + AEAD_TAG_BYTES
    assert aead_decrypt(key, sealed, b"ad") == pt


def _sealed_example() -> tuple[bytes, bytes, bytes]:
    key = h(GCM_VECTORS[-1]["key"])
    ad = b"secagg/ad:\x00\x01\x02\x03"
    return key, ad, aead_encrypt(key, b"twenty byte secret!!", ad)


def test_aead_any_bit_flip_in_ciphertext_or_tag_fails() -> None:
    key, ad, sealed = _sealed_example()
    for bit in range(8 * len(sealed)):
        with pytest.raises(DecryptionError):
            aead_decrypt(key, _flip(sealed, bit), ad)


def test_aead_any_bit_flip_in_associated_data_fails() -> None:
    key, ad, sealed = _sealed_example()
    for bit in range(8 * len(ad)):
        with pytest.raises(DecryptionError):
            aead_decrypt(key, sealed, _flip(ad, bit))
    for other in (b"", ad[:-1], ad + b"\x00"):
        with pytest.raises(DecryptionError):
            aead_decrypt(key, sealed, other)


def test_aead_truncated_or_extended_input_fails() -> None:
    key, ad, sealed = _sealed_example()
    for n in range(len(sealed)):
        with pytest.raises(DecryptionError):
            aead_decrypt(key, sealed[:n], ad, client_id=9)
        with pytest.raises(DecryptionError):
            aead_decrypt(key, sealed[len(sealed) - n :], ad)
    with pytest.raises(DecryptionError):
        aead_decrypt(key, sealed + b"\x00", ad)


def test_aead_wrong_key_fails() -> None:
    key, ad, sealed = _sealed_example()
    for bit in (0, 7, 128, 255):
        with pytest.raises(DecryptionError):
            aead_decrypt(_flip(key, bit), sealed, ad)
    with pytest.raises(DecryptionError):
        aead_decrypt(random_seed(), sealed, ad)


def test_aead_error_carries_client_id() -> None:
    key, ad, sealed = _sealed_example()
    with pytest.raises(DecryptionError) as info:
        aead_decrypt(key, _flip(sealed, 3), ad, client_id=17)
    assert info.value.client_id == 17
    with pytest.raises(DecryptionError) as info:
        aead_decrypt(key, sealed[:5], ad, client_id=18)
    assert info.value.client_id == 18


@pytest.mark.parametrize("length", [0, 16, 24, 31, 33])
def test_aead_rejects_non_256_bit_keys(length: int) -> None:
    with pytest.raises(ConfigurationError):
        aead_encrypt(bytes(length), b"x", b"")
    with pytest.raises(ConfigurationError):
        aead_decrypt(bytes(length), bytes(32), b"")


# --- HKDF-SHA256 (RFC 5869) and derive_key --------------------------------------------------

HKDF_VECTORS = HKDF_KAT["vectors"]
HKDF_IDS = [v["name"].split(":")[0] for v in HKDF_VECTORS]


def _hkdf_reference(ikm: bytes, salt: bytes, info: bytes, length: int) -> tuple[bytes, bytes]:
    """RFC 5869 section 2 with the standard library's HMAC: returns (PRK, OKM)."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return prk, okm[:length]


@pytest.mark.parametrize("vec", HKDF_VECTORS, ids=HKDF_IDS)
def test_rfc5869_pycryptodome(vec: dict[str, Any]) -> None:
    assert vec["hash"] == "SHA-256"
    okm = HKDF(h(vec["ikm"]), vec["length"], h(vec["salt"]), SHA256, context=h(vec["info"]))
    assert okm == h(vec["okm"])


@pytest.mark.parametrize("vec", HKDF_VECTORS, ids=HKDF_IDS)
def test_rfc5869_reference(vec: dict[str, Any]) -> None:
    prk, okm = _hkdf_reference(h(vec["ikm"]), h(vec["salt"]), h(vec["info"]), vec["length"])
    assert prk == h(vec["prk"])
    assert okm == h(vec["okm"])


# The derivation layout of prg.derive_key, fixed by the protocol document:
# info = b"secagg/v1/" || label || each id as a 4-byte big-endian integer.
LABELS = {
    Purpose.SELF_MASK: b"self-mask",
    Purpose.PAIR_MASK: b"pair-mask",
    Purpose.ROUNDING: b"rounding",
    Purpose.GRAPH: b"graph",
    Purpose.HYBRID: b"hybrid",
    Purpose.SHARE_ENC: b"share-enc",
    Purpose.DP_NOISE: b"dp-noise",
    Purpose.DP_ROTATION: b"dp-rotation",
    Purpose.DP_ROUNDING: b"dp-rounding",
}
ID_TUPLES: list[tuple[int, ...]] = [(), (0,), (1,), (7, 9), (9, 7), (1, 2**32 - 1), (3, 4, 5)]


def _expected_info(purpose: Purpose, ids: tuple[int, ...]) -> bytes:
    return b"secagg/v1/" + LABELS[purpose] + b"".join(struct.pack(">I", i) for i in ids)


def test_label_table_covers_every_purpose_and_is_prefix_free() -> None:
    assert set(LABELS) == set(Purpose)
    labels = list(LABELS.values())
    for a in labels:
        for b in labels:
            assert a == b or not b.startswith(a), (a, b)


@pytest.mark.parametrize("ids", ID_TUPLES, ids=[repr(t) for t in ID_TUPLES])
@pytest.mark.parametrize("purpose", list(Purpose), ids=[p.name for p in Purpose])
def test_derive_key_is_hkdf_sha256_with_the_documented_info(
    purpose: Purpose, ids: tuple[int, ...]
) -> None:
    rng = random.Random(f"{purpose.name}{ids}")
    secret, salt = rng.randbytes(32), rng.randbytes(32)
    info = _expected_info(purpose, ids)
    got = derive_key(secret, salt, purpose, *ids)
    assert got == HKDF(secret, KEY_BYTES, salt, SHA256, context=info)
    assert got == _hkdf_reference(secret, salt, info, KEY_BYTES)[1]


def test_derive_key_accepts_longer_keying_material() -> None:
    secret, salt = bytes(range(64)), b"session"
    info = _expected_info(Purpose.GRAPH, ())
    assert derive_key(secret, salt, Purpose.GRAPH) == HKDF(secret, 32, salt, SHA256, context=info)


def test_derive_key_separates_every_input() -> None:
    secret, salt = bytes(range(32)), bytes(range(32, 64))
    keys = {derive_key(secret, salt, p, *ids) for p in Purpose for ids in ID_TUPLES}
    assert len(keys) == len(Purpose) * len(ID_TUPLES)
    base = derive_key(secret, salt, Purpose.PAIR_MASK, 1, 2)
    assert derive_key(_flip(secret, 0), salt, Purpose.PAIR_MASK, 1, 2) != base
    assert derive_key(secret, _flip(salt, 0), Purpose.PAIR_MASK, 1, 2) != base
    assert derive_key(secret, salt, Purpose.PAIR_MASK, 2, 1) != base


@pytest.mark.parametrize("length", [0, 16, 31])
def test_derive_key_rejects_short_keying_material(length: int) -> None:
    with pytest.raises(ConfigurationError):
        derive_key(bytes(length), b"salt", Purpose.SELF_MASK, 1)


@pytest.mark.parametrize("bad_id", [-1, 2**32])
def test_derive_key_rejects_ids_outside_uint32(bad_id: int) -> None:
    with pytest.raises(ConfigurationError):
        derive_key(bytes(32), b"salt", Purpose.PAIR_MASK, 1, bad_id)


# --- ChaCha20 keystreams (RFC 8439) ---------------------------------------------------------

# RFC 8439 section 2.4.2: key 00 01 .. 1f, nonce 00:00:00:00:00:00:00:4a:00:00:00:00,
# initial block counter 1, the "sunscreen" plaintext and its ciphertext.
RFC8439_KEY = bytes(range(32))
RFC8439_2_4_2_NONCE = h("000000000000004a00000000")
RFC8439_2_4_2_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
RFC8439_2_4_2_CIPHERTEXT = h(
    "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
    "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
    "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
    "5af90bbf74a35be6b40b8eedf2785e42874d"
)
# RFC 8439 section 2.3.2: same key, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block count 1,
# the serialized block.
RFC8439_2_3_2_NONCE = h("000000090000004a00000000")
RFC8439_2_3_2_BLOCK = h(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


def test_chacha20_rfc8439_2_4_2_keystream() -> None:
    cipher = ChaCha20.new(key=RFC8439_KEY, nonce=RFC8439_2_4_2_NONCE)
    cipher.seek(64)  # block counter 1
    stream = cipher.encrypt(bytes(len(RFC8439_2_4_2_PLAINTEXT)))
    assert bytes(a ^ b for a, b in zip(stream, RFC8439_2_4_2_PLAINTEXT, strict=True)) == (
        RFC8439_2_4_2_CIPHERTEXT
    )


def test_chacha20_rfc8439_2_3_2_block() -> None:
    cipher = ChaCha20.new(key=RFC8439_KEY, nonce=RFC8439_2_3_2_NONCE)
    cipher.seek(64)
    assert cipher.encrypt(bytes(64)) == RFC8439_2_3_2_BLOCK


@pytest.mark.parametrize("purpose", list(Purpose), ids=[p.name for p in Purpose])
def test_keystream_layout_nonce_and_counter_zero(purpose: Purpose) -> None:
    """Nonce = purpose tag || 11 zero bytes, block counter from 0 (prg module docstring)."""
    assert nonce_for(purpose) == bytes([int(purpose)]) + bytes(11)
    ref = ChaCha20.new(key=RFC8439_KEY, nonce=bytes([int(purpose)]) + bytes(11))
    assert keystream_bytes(RFC8439_KEY, purpose, 200) == ref.encrypt(bytes(200))


def test_keystream_offsets() -> None:
    rng = random.Random(8439)
    key = rng.randbytes(32)
    full = keystream_bytes(key, Purpose.PAIR_MASK, 4096 + 300)
    offsets = [0, 1, 7, 63, 64, 65, 127, 128, 129, 1000, 4095, 4096, 4097]
    offsets += [rng.randrange(4096) for _ in range(40)]
    for offset in offsets:
        n = rng.randrange(300)
        got = keystream_bytes(key, Purpose.PAIR_MASK, n, offset)
        assert got == keystream_bytes(key, Purpose.PAIR_MASK, offset + n)[offset:], offset
        assert got == full[offset : offset + n], offset


def test_keystream_far_offset_matches_pycryptodome_seek() -> None:
    key = bytes(range(32))
    for offset in (2**20 + 3, 2**35 - 1, MAX_STREAM_BYTES - 64, MAX_STREAM_BYTES - 5):
        n = min(100, MAX_STREAM_BYTES - offset)
        ref = ChaCha20.new(key=key, nonce=nonce_for(Purpose.HYBRID))
        ref.seek(offset)
        assert keystream_bytes(key, Purpose.HYBRID, n, offset) == ref.encrypt(bytes(n))


def test_different_purposes_give_different_streams() -> None:
    key = bytes(32)
    streams = {keystream_bytes(key, p, 64) for p in Purpose}
    assert len(streams) == len(Purpose)


def test_different_keys_give_different_streams() -> None:
    key = random_seed()
    assert keystream_bytes(key, Purpose.SELF_MASK, 64) != keystream_bytes(
        _flip(key, 0), Purpose.SELF_MASK, 64
    )


def test_keystream_words_are_little_endian() -> None:
    key = random_seed()
    raw = keystream_bytes(key, Purpose.ROUNDING, 64)
    u64 = keystream_u64(key, Purpose.ROUNDING, 8)
    u32 = keystream_u32(key, Purpose.ROUNDING, 16)
    assert u64.dtype == np.uint64 and u32.dtype == np.uint32
    assert [int(w) for w in u64] == [
        int.from_bytes(raw[8 * j : 8 * j + 8], "little") for j in range(8)
    ]
    assert [int(w) for w in u32] == [
        int.from_bytes(raw[4 * j : 4 * j + 4], "little") for j in range(16)
    ]


def test_keystream_zero_length() -> None:
    assert keystream_bytes(bytes(32), Purpose.GRAPH, 0) == b""
    assert keystream_bytes(bytes(32), Purpose.GRAPH, 0, 12345) == b""


@pytest.mark.parametrize(
    ("nbytes", "offset"),
    [
        (-1, 0),
        (0, -1),
        (1, MAX_STREAM_BYTES),
        (65, MAX_STREAM_BYTES - 64),
        (MAX_STREAM_BYTES + 1, 0),
    ],
)
def test_keystream_outside_counter_space_is_rejected(nbytes: int, offset: int) -> None:
    with pytest.raises(ConfigurationError):
        keystream_bytes(bytes(32), Purpose.SELF_MASK, nbytes, offset)


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_keystream_rejects_wrong_length_key(length: int) -> None:
    with pytest.raises(ConfigurationError):
        keystream_bytes(bytes(length), Purpose.SELF_MASK, 8)


# --- OpenSSL hot path against pycryptodome ----------------------------------------------------
#
# secagg.keys runs X25519, Ed25519 and AES-GCM through OpenSSL (``cryptography``) and HKDF
# through OpenSSL too (secagg.prg); pycryptodome is the independent implementation each is
# checked against here, on the RFC vectors and on random inputs both ways.

_ED_L = 2**252 + 27742317777372353535851937790883648493
"""Order of the Ed25519 base point (RFC 8032 section 5.1)."""


@pytest.mark.parametrize(
    "vec", X25519_KAT["scalar_mult"], ids=[v["name"] for v in X25519_KAT["scalar_mult"]]
)
def test_rfc7748_5_2_scalar_mult_openssl_matches_pycryptodome(vec: dict[str, str]) -> None:
    scalar, u = h(vec["scalar"]), h(vec["u"])
    ours = X25519PrivateKey.from_private_bytes(scalar).exchange(
        X25519PublicKey.from_public_bytes(u)
    )
    assert ours == _x25519_pycryptodome(scalar, u) == h(vec["output"])
    canonical = int.from_bytes(u, "little") & ((1 << 255) - 1)
    if canonical < _P25519 and canonical == int.from_bytes(u, "little"):
        assert AgreementKey(private=scalar).agree(u) == h(vec["output"])


def test_rfc7748_6_1_public_keys_match_pycryptodome() -> None:
    dh = X25519_KAT["diffie_hellman"]
    for who in ("alice", "bob"):
        private = h(dh[f"{who}_private"])
        theirs = import_x25519_private_key(private).public_key().export_key(format="raw")
        assert AgreementKey(private=private).public == theirs == h(dh[f"{who}_public"])


@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
def test_x25519_openssl_and_pycryptodome_agree_both_ways(a: bytes, b: bytes) -> None:
    ours = AgreementKey(private=a)
    theirs = import_x25519_private_key(b)
    their_public = theirs.public_key().export_key(format="raw")
    assert ours.public == import_x25519_private_key(a).public_key().export_key(format="raw")
    expected = _x25519_pycryptodome(b, ours.public)
    assert ours.agree(their_public) == expected
    assert AgreementKey(private=b).agree(ours.public) == expected


@pytest.mark.parametrize("vec", ED_VECTORS, ids=ED_IDS)
def test_rfc8032_7_1_openssl_matches_pycryptodome(vec: dict[str, str]) -> None:
    """Ed25519 is deterministic: both libraries give the RFC's signature byte for byte."""
    seed, msg, sig = h(vec["secret_key"]), h(vec["message"]), h(vec["signature"])
    theirs = eddsa.new(eddsa.import_private_key(seed), "rfc8032")
    assert IdentityKey(private=seed).sign(msg) == theirs.sign(msg) == sig
    assert eddsa.import_private_key(seed).public_key().export_key(format="raw") == h(
        vec["public_key"]
    )


@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=300))
def test_ed25519_openssl_and_pycryptodome_cross_verify(seed: bytes, msg: bytes) -> None:
    ours = IdentityKey(private=seed)
    theirs = eddsa.import_private_key(seed)
    assert ours.public == theirs.public_key().export_key(format="raw")
    sig = ours.sign(msg)
    assert sig == eddsa.new(theirs, "rfc8032").sign(msg)
    eddsa.new(theirs.public_key(), "rfc8032").verify(msg, sig)  # pycryptodome accepts ours
    verify_signature(ours.public, msg, sig)  # and we accept pycryptodome's (the same bytes)
    bad = _flip(sig, len(msg) % 512)
    with pytest.raises(ValueError):
        eddsa.new(theirs.public_key(), "rfc8032").verify(msg, bad)
    with pytest.raises(InvalidSignature):
        verify_signature(ours.public, msg, bad)


def _edwards_point(y: int, sign: int) -> Any:
    """pycryptodome's decoding of ``y`` with x sign bit ``sign`` (or None if it refuses)."""
    try:
        return eddsa.import_public_key((y | sign << 255).to_bytes(32, "little")).pointQ
    except ValueError:
        return None


@pytest.mark.skipif(
    int(Crypto.__version__.split(".")[0]) < 4,
    reason="pycryptodome 3.x decodes the torsion points wrongly (refuses y = 0 and y = p - 1); "
    "the blocklist itself is pure integers and is proved here with pycryptodome 4",
)
def test_ed25519_small_order_blocklist_is_exactly_the_eight_torsion_points() -> None:
    """The y-coordinate lookup in keys._import_identity_key replaces a scalar multiplication
    by 8; here pycryptodome's point arithmetic shows the list is complete and exact: the
    points generated by an order-8 point have exactly these y values, each decodable point
    with one of them has ``8 P = 0``."""
    blocklist = keys_module._ED25519_SMALL_ORDER_Y
    y8 = min(y for y in blocklist if y > 1 and y != _P25519 - 1)
    p = _edwards_point(y8, 0)
    assert p is not None and not (p * 4).is_point_at_infinity()
    assert (p * 8).is_point_at_infinity()
    ys = {int((p * i).xy[1]) for i in range(8)}
    assert ys == set(blocklist)
    for y in blocklist:
        for sign in (0, 1):
            point = _edwards_point(y, sign)
            if point is not None:
                assert (point * 8).is_point_at_infinity()
                encoded = (y | sign << 255).to_bytes(32, "little")
                with pytest.raises(InvalidSignature):
                    check_identity_key(encoded)


@given(seed=st.binary(min_size=32, max_size=32))
def test_ed25519_honest_keys_are_not_small_order(seed: bytes) -> None:
    public = IdentityKey(private=seed).public
    check_identity_key(public)
    assert not (eddsa.import_public_key(public).pointQ * 8).is_point_at_infinity()


def test_ed25519_mixed_order_key_is_decoded_and_its_signatures_checked() -> None:
    """A key with a small-order component (A + T) is not small order: it passes the
    blocklist, and a signature made under A does not verify under A + T."""
    vec = ED_VECTORS[1]
    a = eddsa.import_public_key(h(vec["public_key"])).pointQ
    y8 = min(y for y in keys_module._ED25519_SMALL_ORDER_Y if y > 1 and y != _P25519 - 1)
    t = _edwards_point(y8, 0)
    mixed = eddsa.EccKey(curve="ed25519", point=a + t).export_key(format="raw")
    check_identity_key(mixed)
    with pytest.raises(InvalidSignature):
        verify_signature(mixed, h(vec["message"]), h(vec["signature"]))


def test_openssl_refuses_s_plus_l_too() -> None:
    """Both libraries refuse a non-canonical ``S`` (RFC 8032 section 5.1.7)."""
    vec = ED_VECTORS[2]
    sig = h(vec["signature"])
    s = int.from_bytes(sig[32:], "little") + _ED_L
    forged = sig[:32] + s.to_bytes(32, "little")
    with pytest.raises(InvalidSignature):
        verify_signature(h(vec["public_key"]), h(vec["message"]), forged)
    with pytest.raises(ValueError):
        eddsa.new(eddsa.import_public_key(h(vec["public_key"])), "rfc8032").verify(
            h(vec["message"]), forged
        )


@given(
    key=st.binary(min_size=32, max_size=32),
    plaintext=st.binary(max_size=200),
    aad=st.binary(max_size=80),
)
def test_aes_gcm_openssl_and_pycryptodome_both_ways(
    key: bytes, plaintext: bytes, aad: bytes
) -> None:
    ours = aead_encrypt(key, plaintext, aad)
    cipher = AES.new(key, AES.MODE_GCM, nonce=AEAD_NONCE, mac_len=AEAD_TAG_BYTES)
    cipher.update(aad)
    ct, tag = cipher.encrypt_and_digest(plaintext)
    assert ours == ct + tag
    check = AES.new(key, AES.MODE_GCM, nonce=AEAD_NONCE, mac_len=AEAD_TAG_BYTES)
    check.update(aad)
    assert check.decrypt_and_verify(ours[:-AEAD_TAG_BYTES], ours[-AEAD_TAG_BYTES:]) == plaintext
    assert aead_decrypt(key, ct + tag, aad) == plaintext


@given(
    secret=st.binary(min_size=32, max_size=64),
    salt=st.binary(max_size=64),
    ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
)
def test_derive_key_openssl_matches_pycryptodome_hkdf(
    secret: bytes, salt: bytes, ids: list[int]
) -> None:
    info = _expected_info(Purpose.PAIR_MASK, tuple(ids))
    expected = HKDF(secret, KEY_BYTES, salt, SHA256, context=info)
    assert derive_key(secret, salt, Purpose.PAIR_MASK, *ids) == expected
