"""CKKS building blocks: exact integer sums, masks, refusals, contexts, worker process."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
import tenseal as ts

from secagg import ckks
from secagg.errors import (
    ConfigurationError,
    CryptoError,
    DecryptionError,
    InputError,
    MalformedMessage,
)
from secagg.he_params import HEParams, select_params

N_CLIENTS = 12
U64 = npt.NDArray[np.uint64]


@pytest.fixture(scope="module")
def ckks_params() -> HEParams:
    # 8-bit values, weights up to 5: five ciphertexts per client (N = 4096)
    return select_params(N_CLIENTS, 8, 40_000, "ckks", max_weight=5)


@pytest.fixture(scope="module")
def hybrid_params() -> HEParams:
    return select_params(N_CLIENTS, 8, 30_000, "hybrid")  # three ciphertexts per client


@pytest.fixture(scope="module")
def ckks_keys(ckks_params: HEParams) -> tuple[ckks.SecretContext, ckks.ServerContext, bytes]:
    secret = ckks.make_secret_context(ckks_params)
    public = ckks.make_public_context(secret)
    return (
        ckks.load_secret_context(secret, ckks_params),
        ckks.load_server_context(public, ckks_params),
        public,
    )


@pytest.fixture(scope="module")
def hybrid_keys(
    hybrid_params: HEParams,
) -> tuple[ckks.SecretContext, ckks.ServerContext, bytes]:
    secret = ckks.make_secret_context(hybrid_params)
    public = ckks.make_public_context(secret)
    return (
        ckks.load_secret_context(secret, hybrid_params),
        ckks.load_server_context(public, hybrid_params),
        secret,
    )


@pytest.fixture(scope="module")
def one_upload(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> list[bytes]:
    rng = np.random.default_rng(7)
    q = rng.integers(0, 256, ckks_params.n_values, dtype=np.uint64)
    return ckks.encrypt(ckks_keys[0], ckks.pack_lanes(q, ckks_params))


# --- lanes ---------------------------------------------------------------------------------


def test_lane_layout_is_lane_major(ckks_params: HEParams) -> None:
    p = ckks_params
    rng = np.random.default_rng(1)
    vals = rng.integers(0, p.max_lane_value + 1, p.n_values, dtype=np.uint64)
    slots = ckks.pack_lanes(vals, p)
    s = p.n_slots
    assert slots.size == s and slots.dtype == np.uint64
    for j in (0, 1, s - 1, s, p.n_values - 1):
        lane = j // s
        assert (int(slots[j % s]) >> (lane * p.lane_bits)) & ((1 << p.lane_bits) - 1) == vals[j]
    assert np.array_equal(ckks.unpack_lanes(slots, p), vals)
    assert int(slots.max()) < 1 << p.slot_value_bits


def test_pack_refuses_bad_lanes(ckks_params: HEParams) -> None:
    p = ckks_params
    with pytest.raises(InputError, match="lane values"):
        ckks.pack_lanes(np.zeros(p.n_values - 1, dtype=np.uint64), p)
    too_big = np.zeros(p.n_values, dtype=np.uint64)
    too_big[3] = p.max_lane_value + 1
    with pytest.raises(InputError, match="at most"):
        ckks.pack_lanes(too_big, p)
    with pytest.raises(InputError, match="non-negative"):
        ckks.pack_lanes(-np.ones(p.n_values, dtype=np.int64), p)
    with pytest.raises(InputError, match="integers"):
        ckks.pack_lanes(np.zeros(p.n_values), p)


# --- exact aggregates ----------------------------------------------------------------------


def test_exact_weighted_sum_ckks(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    p, (sk, server, _) = ckks_params, ckks_keys
    assert p.n_ciphertexts >= 2 and p.weighted
    rng = np.random.default_rng(2)
    total = np.zeros(p.n_values, dtype=np.uint64)
    uploads = []
    for u in range(p.n_clients):
        w = int(rng.integers(1, p.max_weight + 1)) if u else p.max_weight
        q = np.full(p.dim, 255, np.uint64) if u < 2 else rng.integers(0, 256, p.dim, np.uint64)
        lanes = np.append(q * np.uint64(w), np.uint64(w))  # w*q and the weight lane
        total += lanes
        uploads.append(ckks.encrypt(sk, ckks.pack_lanes(lanes, p)))
    summed = ckks.sum_ciphertexts(server, uploads)
    slots = ckks.decrypt(sk, summed)
    assert slots.dtype == np.uint64
    assert np.array_equal(ckks.unpack_lanes(slots, p), total)


def _pair_masks(p: HEParams, n: int, seed: int) -> dict[tuple[int, int], U64]:
    rng = np.random.default_rng(seed)
    return {
        (i, j): ckks.masks_from_words(rng.integers(0, 2**64, p.n_slots, np.uint64), p)
        for i in range(n)
        for j in range(i + 1, n)
    }


def _client_mask(p: HEParams, masks: dict[tuple[int, int], U64], u: int, n: int) -> U64:
    """SecAgg-style: +m_uv for v > u, -m_vu for v < u, modulo 2^mask_bits."""
    total = np.zeros(p.n_slots, np.uint64)
    for v in range(n):
        if v > u:
            total = ckks.add_masks(total, masks[(u, v)], p)
        elif v < u:
            total = ckks.add_masks(total, ckks.negate_masks(masks[(v, u)], p), p)
    return total


def test_exact_sum_hybrid_with_dropout(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    p, (sk, server, _) = hybrid_params, hybrid_keys
    n = p.n_clients
    masks = _pair_masks(p, n, seed=3)
    rng = np.random.default_rng(4)
    dropped = 5
    total = np.zeros(p.n_values, np.uint64)
    acc = ckks.CiphertextSum(server)
    for u in range(n):
        q = rng.integers(0, 256, p.n_values, np.uint64)
        masked = ckks.add_masks(ckks.pack_lanes(q, p), _client_mask(p, masks, u, n), p)
        if u != dropped:
            total += q
            acc.add(ckks.encrypt(sk, masked), client_id=u)
    # the server recovers the dropped client's pair masks and adds what cancels them
    leftover = np.zeros(p.n_slots, np.uint64)
    for u in range(n):
        if u != dropped:
            pair = (min(u, dropped), max(u, dropped))
            own = masks[pair] if u < dropped else ckks.negate_masks(masks[pair], p)
            leftover = ckks.add_masks(leftover, own, p)
    summed = acc.finish(plain_addend=ckks.negate_masks(leftover, p))
    slots = ckks.decrypt(sk, summed)
    assert int(slots.max()) >= 1 << p.mask_bits  # carries above the mask modulus happened
    assert np.array_equal(ckks.unpack_lanes(ckks.unmask_sum(slots, p), p), total)


def test_hybrid_extreme_values_use_the_whole_budget(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    """n slot values and the addend all at 2^mask_bits - 1: the largest sum still exact."""
    p, (sk, server, _) = hybrid_params, hybrid_keys
    top = np.full(p.n_slots, (1 << p.mask_bits) - 1, np.uint64)
    upload = ckks.encrypt(sk, top)
    summed = ckks.sum_ciphertexts(server, [upload] * p.n_clients, plain_addend=top)
    slots = ckks.decrypt(sk, summed)
    assert np.all(slots == np.uint64((p.n_clients + 1) * ((1 << p.mask_bits) - 1)))
    assert int(slots[0]) < 1 << p.slot_sum_bits


def test_lone_hybrid_ciphertext_looks_uniform(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    """A key holder decrypting one masked upload sees uniform lanes (chi-square, 64 bins)."""
    p, (sk, _, _) = hybrid_params, hybrid_keys
    rng = np.random.default_rng(5)
    q = np.minimum(rng.poisson(3.0, p.n_values), 255).astype(np.uint64)  # very non-uniform
    mask = ckks.masks_from_words(rng.integers(0, 2**64, p.n_slots, np.uint64), p)
    slots = ckks.decrypt(sk, ckks.encrypt(sk, ckks.add_masks(ckks.pack_lanes(q, p), mask, p)))

    def chi_square_z(values: U64, bits: int) -> float:
        bins = 64
        counts = np.bincount((values >> np.uint64(bits - 6)).astype(np.int64), minlength=bins)
        expected = values.size / bins
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        k = bins - 1  # Wilson-Hilferty: chi2/k approximately normal after a cube root
        return (math.pow(chi2 / k, 1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))

    assert chi_square_z(ckks.unpack_lanes(slots, p), p.lane_bits) < 4.75  # p ~ 1e-6
    assert chi_square_z(slots, p.mask_bits) < 4.75
    assert chi_square_z(ckks.unpack_lanes(ckks.pack_lanes(q, p), p), p.lane_bits) > 100
    assert np.array_equal(ckks.unpack_lanes(ckks.unmask_sum(slots - mask, p), p), q)


# --- noise ----------------------------------------------------------------------------------


def test_rounding_check_catches_noise_overflow(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    """A server ignoring the n_clients limit: 2^30 copies of an encryption of zero."""
    p, (sk, server, _) = ckks_params, ckks_keys
    upload = ckks.encrypt(sk, np.zeros(p.n_slots, np.uint64))
    assert not ckks.decrypt(sk, upload).any()
    overflowed = []
    for data in upload:
        ct = server._load_ciphertext(data, seeded=True, client_id=None, index=0)
        for _ in range(30):  # doubling: the noise doubles, the value stays 0
            server._evaluator.add_inplace(ct, ct)
        overflowed.append(server._dump(ct))
    with pytest.raises(CryptoError, match="noise budget exceeded"):
        ckks.decrypt(sk, overflowed)


def test_sum_refuses_more_than_n_clients(
    ckks_params: HEParams,
    ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
    one_upload: list[bytes],
) -> None:
    acc = ckks.CiphertextSum(ckks_keys[1])
    for u in range(ckks_params.n_clients):
        acc.add(one_upload, client_id=u)
    with pytest.raises(ConfigurationError, match="summands"):
        acc.add(one_upload)


def test_overflowing_input_detected_at_decryption(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    """Slot values at the client bound summed n times leave [0, 2^slot_sum_bits)."""
    p, (sk, server, _) = ckks_params, ckks_keys
    top = ckks.encrypt(sk, np.full(p.n_slots, (1 << p.slot_value_bits) - 1, np.uint64))
    with pytest.raises(DecryptionError, match="outside"):
        ckks.decrypt(sk, ckks.sum_ciphertexts(server, [top, top]))


# --- malformed ciphertexts -------------------------------------------------------------------


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        (lambda c: c[:-1], "bytes, expected|header says"),
        (lambda c: c[: len(c) // 2], "bytes, expected"),
        (lambda c: c[:100] + bytes(len(c) - 100), "SEAL refused"),
        (lambda c: _flip(c, 0, 3), "not a SEAL object"),
        (lambda c: _flip(c, 8, 0), "header says"),
        (lambda c: c + b"\x00", "header says|bytes, expected"),
    ],
    ids=["truncated-1", "truncated-half", "zeroed", "magic", "size-field", "appended"],
)
def test_malformed_uploads_refused(
    ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
    one_upload: list[bytes],
    how: object,
    match: str,
) -> None:
    bad = list(one_upload)
    bad[1] = how(bad[1])  # type: ignore[operator]
    acc = ckks.CiphertextSum(ckks_keys[1])
    with pytest.raises(MalformedMessage, match=match) as info:
        acc.add(bad, client_id=42)
    assert info.value.client_id == 42
    assert acc.count == 0


def test_malformed_upload_leaves_sum_unchanged(
    ckks_params: HEParams,
    ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
    one_upload: list[bytes],
) -> None:
    sk, server, _ = ckks_keys
    acc = ckks.CiphertextSum(server)
    acc.add(one_upload)
    with pytest.raises(MalformedMessage):
        acc.add([*one_upload[:-1], one_upload[-1][:-10]])
    with pytest.raises(MalformedMessage, match="expected"):
        acc.add(one_upload[:-1], client_id=3)
    with pytest.raises(MalformedMessage, match="bytes"):
        acc.add([*one_upload[:-1], "text"], client_id=3)  # type: ignore[list-item]
    acc.add(one_upload)
    twice = ckks.decrypt(sk, acc.finish())
    assert np.array_equal(twice, ckks.decrypt(sk, one_upload) * np.uint64(2))


def test_bit_flips_in_seed_or_data_detected(
    ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes], one_upload: list[bytes]
) -> None:
    sk, server, _ = ckks_keys
    # header 16 B, then metadata; the seed sits after the c0 words at the end
    for pos, bit in ((len(one_upload[0]) - 20, 0), (len(one_upload[0]) // 2 + 7, 3)):
        bad = list(one_upload)
        bad[0] = _flip(bad[0], pos, bit)
        with pytest.raises((MalformedMessage, DecryptionError)):
            ckks.decrypt(sk, ckks.sum_ciphertexts(server, [bad]))


def test_ciphertext_from_another_key_refused(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    other = ckks.load_secret_context(ckks.make_secret_context(ckks_params), ckks_params)
    foreign = ckks.encrypt(other, np.ones(ckks_params.n_slots, np.uint64))
    summed = ckks.sum_ciphertexts(ckks_keys[1], [foreign])  # the server cannot tell
    with pytest.raises(DecryptionError):
        ckks.decrypt(ckks_keys[0], summed)


def test_ciphertext_from_other_parameters_refused(
    ckks_params: HEParams,
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
    ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
    one_upload: list[bytes],
) -> None:
    hybrid_upload = ckks.encrypt(hybrid_keys[0], np.zeros(hybrid_params.n_slots, np.uint64))
    with pytest.raises(MalformedMessage):
        ckks.sum_ciphertexts(ckks_keys[1], [hybrid_upload[: ckks_params.n_ciphertexts]])
    with pytest.raises(MalformedMessage):
        ckks.decrypt(hybrid_keys[0], one_upload[: hybrid_params.n_ciphertexts])
    # same ring, other scale: parsed, then refused on the scale
    rescaled = dataclasses.replace(ckks_params, scale_bits=ckks_params.scale_bits - 1)
    sk2 = ckks.load_secret_context(ckks.make_secret_context(rescaled), rescaled)
    with pytest.raises(MalformedMessage, match="scale"):
        ckks.sum_ciphertexts(
            ckks_keys[1], [ckks.encrypt(sk2, np.zeros(rescaled.n_slots, np.uint64))]
        )


def test_encrypt_input_checks(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    sk = ckks_keys[0]
    n = ckks_params.n_slots
    with pytest.raises(InputError, match="expected"):
        ckks.encrypt(sk, np.zeros(n + 1, np.uint64))
    with pytest.raises(InputError, match="below"):
        ckks.encrypt(sk, np.full(n, 1 << ckks_params.slot_value_bits, np.uint64))
    with pytest.raises(InputError, match="integers"):
        ckks.encrypt(sk, np.zeros(n))
    with pytest.raises(ConfigurationError, match="hybrid"):
        ckks.sum_ciphertexts(
            ckks_keys[1], [ckks.encrypt(sk, np.zeros(n, np.uint64))], np.zeros(n, np.uint64)
        )
    with pytest.raises(ConfigurationError, match="no ciphertexts"):
        ckks.sum_ciphertexts(ckks_keys[1], [])


def test_decrypt_returns_requested_prefix(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    sk = ckks_keys[0]
    slots = np.arange(ckks_params.n_slots, dtype=np.uint64)
    out = ckks.decrypt(sk, ckks.encrypt(sk, slots), count=100)
    assert out.dtype == np.uint64 and np.array_equal(out, slots[:100])
    with pytest.raises(ConfigurationError):
        ckks.decrypt(sk, ckks.encrypt(sk, slots), count=ckks_params.n_slots + 1)


# --- contexts ---------------------------------------------------------------------------------


def test_server_context_has_no_secret_key(
    ckks_params: HEParams, ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes]
) -> None:
    public = ckks_keys[2]
    assert len(public) < 200  # parameters and scale only
    from secagg._gen.ckks_context_pb2 import ContextFile

    assert not ContextFile.FromString(public).HasField("private_context")
    ctx = ts.Context.load(public, n_threads=1)
    assert not ctx.is_private()
    assert not ctx.has_relin_keys() and not ctx.has_galois_keys()
    with pytest.raises(ValueError, match="Secret key"):
        ctx.data.secret_key()
    with pytest.raises(ValueError, match="decryption"):
        ctx.data.decryptor()
    with pytest.raises(ValueError, match="encryption"):
        ts.ckks_vector(ctx, [1.0])
    with pytest.raises(ConfigurationError, match="no secret key"):
        ckks.load_secret_context(public, ckks_params)


def test_server_refuses_secret_or_keyed_contexts(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    secret = hybrid_keys[2]
    with pytest.raises(ConfigurationError, match="secret key"):
        ckks.load_server_context(secret, hybrid_params)
    sym = ts.context(
        ts.SCHEME_TYPE.CKKS,
        4096,
        coeff_mod_bit_sizes=[40, 40],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        n_threads=1,
    )  # TenSEAL generates relinearisation keys by default
    with_relin = sym.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True
    )
    with pytest.raises(ConfigurationError, match="relinearisation"):
        ckks.load_server_context(with_relin, hybrid_params)
    asym = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 40], n_threads=1)
    with pytest.raises(ConfigurationError, match="symmetric"):
        ckks.load_server_context(asym.serialize(save_secret_key=False), hybrid_params)
    with pytest.raises(ConfigurationError):
        ckks.load_server_context(b"\xff\xff\xff", hybrid_params)


def test_context_must_match_parameters(
    ckks_params: HEParams,
    hybrid_params: HEParams,
    ckks_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    public = ckks_keys[2]
    if (ckks_params.poly_modulus_degree, ckks_params.scale_bits) != (
        hybrid_params.poly_modulus_degree,
        hybrid_params.scale_bits,
    ):
        with pytest.raises(ConfigurationError, match="context"):
            ckks.load_server_context(public, hybrid_params)
    tampered = public.replace(struct.pack("<d", ckks_params.scale), struct.pack("<d", 3.0))
    with pytest.raises(ConfigurationError, match="scale"):
        ckks.load_server_context(tampered, ckks_params)


# --- worker process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> Iterator[tuple[ckks.HEWorker, ckks.HEWorker]]:
    secret = hybrid_keys[2]
    public = ckks.make_public_context(secret)
    with (
        ckks.HEWorker(hybrid_params, secret, role="secret") as key_holder,
        ckks.HEWorker(hybrid_params, public, role="server") as server,
    ):
        yield key_holder, server


def test_worker_round_trip(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
    workers: tuple[ckks.HEWorker, ckks.HEWorker],
) -> None:
    p, (sk, _, _) = hybrid_params, hybrid_keys
    key_holder, server = workers
    rng = np.random.default_rng(6)
    slots = [rng.integers(0, 1 << p.mask_bits, p.n_slots, np.uint64) for _ in range(3)]
    uploads = [
        key_holder.encrypt(slots[0]),
        ckks.encrypt(sk, slots[1]),
        key_holder.encrypt(slots[2]),
    ]
    addend = rng.integers(0, 1 << p.mask_bits, p.n_slots, np.uint64)
    summed = server.sum_ciphertexts(uploads, plain_addend=addend)
    expected = slots[0] + slots[1] + slots[2] + addend
    assert np.array_equal(key_holder.decrypt(summed), expected)
    assert np.array_equal(ckks.decrypt(sk, summed), expected)


def test_worker_errors_keep_their_type(
    hybrid_params: HEParams,
    workers: tuple[ckks.HEWorker, ckks.HEWorker],
) -> None:
    key_holder, server = workers
    upload = key_holder.encrypt(np.zeros(hybrid_params.n_slots, np.uint64))
    server.begin_sum()
    with pytest.raises(MalformedMessage, match=r"truncated|bytes, expected") as info:
        server.add_upload([upload[0][:-1], *upload[1:]], client_id=9)
    assert info.value.client_id == 9
    with pytest.raises(ConfigurationError, match="no key"):
        server.encrypt(np.zeros(hybrid_params.n_slots, np.uint64))
    with pytest.raises(InputError):
        key_holder.encrypt(np.zeros(3, np.uint64))
    server.add_upload(upload)
    assert not key_holder.decrypt(server.finish_sum()).any()
    with pytest.raises(ConfigurationError, match="secret key"):
        ckks.HEWorker(hybrid_params, ckks.make_secret_context(hybrid_params), role="server")


def test_worker_pool_shards_and_reports_refused_uploads(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    p, (sk, _, secret) = hybrid_params, hybrid_keys
    rng = np.random.default_rng(8)
    slots = [rng.integers(0, 1 << p.mask_bits, p.n_slots, np.uint64) for _ in range(5)]
    uploads = [ckks.encrypt(sk, s) for s in slots]
    bad = [uploads[2][0][:-3], *uploads[2][1:]]
    with ckks.HEWorkerPool(p, ckks.make_public_context(secret), workers=2) as pool:
        pool.begin_sum()
        refused: list[MalformedMessage] = []
        for cid, upload in enumerate([uploads[0], uploads[1], bad, uploads[3], uploads[4]]):
            refused += pool.add_upload(upload, client_id=cid)
        refused += pool.drain()
        assert [e.client_id for e in refused] == [2]
        summed = pool.finish_sum(plain_addend=slots[2])  # stands in for a recovered mask
        assert np.array_equal(ckks.decrypt(sk, summed), sum(slots, np.zeros(p.n_slots, np.uint64)))
        with pytest.raises(MalformedMessage) as info:
            pool.sum_ciphertexts([uploads[0], bad])
        assert info.value.client_id == 1
        assert np.array_equal(ckks.decrypt(sk, pool.sum_ciphertexts([uploads[4]])), slots[4])


def test_threads_use_their_own_memory_file(
    hybrid_params: HEParams,
    hybrid_keys: tuple[ckks.SecretContext, ckks.ServerContext, bytes],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    p, (sk, _, _) = hybrid_params, hybrid_keys

    def roundtrip(seed: int) -> bool:
        slots = np.random.default_rng(seed).integers(0, 1 << p.mask_bits, p.n_slots, np.uint64)
        return bool(np.array_equal(ckks.decrypt(sk, ckks.encrypt(sk, slots)), slots))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(roundtrip, range(8)))
