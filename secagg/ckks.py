"""CKKS building blocks of the ``ckks`` and ``hybrid`` modes: pack, encrypt, sum, decrypt.

Integers only. Clients pack quantized lanes into slot values (:func:`pack_lanes`), hybrid
clients add masks modulo ``2^mask_bits`` (:func:`add_masks`), and encrypt with the shared
secret key (:func:`encrypt`): symmetric CKKS, both parts of each complex slot used, and the
second ciphertext polynomial replaced by its 64-byte PRNG seed, so an upload is one
polynomial. The server adds ciphertexts and an optional plaintext (:func:`sum_ciphertexts`,
:class:`CiphertextSum`); it holds a context without any key. Key holders decrypt
(:func:`decrypt`), which rounds every value to an integer and refuses values farther than
:data:`~secagg.he_params.ROUNDING_TOLERANCE` from one: raw CKKS decryptions leak the noise and
with it the key (Li and Micciancio, EUROCRYPT 2021, "IND-CPA-D"), so floats never leave.

TenSEAL 0.3.18 is used for its context format (``tenseal.Context``, symmetric encryption type,
``n_threads=1``) and its SEAL bindings (``tenseal.sealapi``) for the operations: TenSEAL's
vectors would use only the real parts of the slots and upload both polynomials. The SEAL
bindings serialize through file paths only, so objects pass through an in-memory file
(``memfd``). Ciphertexts on the wire are SEAL serializations, checked for length and header
before SEAL parses them; nothing is pickled. :class:`HEWorker` runs all of this in a separate
process (``spawn``) speaking bytes only.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import struct
import tempfile
import threading
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt
import tenseal as ts
from tenseal import sealapi as sa

from secagg import errors
from secagg.errors import (
    ConfigurationError,
    CryptoError,
    DecryptionError,
    InputError,
    MalformedMessage,
    SecAggError,
)
from secagg.he_params import ROUNDING_TOLERANCE, HEParams

__all__ = [
    "CiphertextSum",
    "HEWorker",
    "HEWorkerPool",
    "SecretContext",
    "ServerContext",
    "add_masks",
    "decrypt",
    "encrypt",
    "load_secret_context",
    "load_server_context",
    "make_public_context",
    "make_secret_context",
    "mask_modulus_bits",
    "masks_from_words",
    "negate_masks",
    "pack_lanes",
    "sum_ciphertexts",
    "unmask_sum",
    "unpack_lanes",
]

U64Array = npt.NDArray[np.uint64]

N_THREADS: Final = 1
"""TenSEAL thread-pool size of every context (its pool corrupts memory when embedded)."""

SEAL_MAGIC: Final = 0xA15E
"""``seal::Serialization::seal_magic``: first two bytes (little-endian) of a SEAL object."""

SEAL_HEADER: Final = struct.Struct("<HBBBBHQ")
"""``seal::Serialization::SEALHeader``: magic, header size, version major, version minor,
compression mode, reserved, total size (SEAL 4 ``serialization.h``)."""

SEAL_COMPR_MODES: Final = frozenset({0, 1, 2})
"""``compr_mode_type``: none, zlib, zstd."""

_SYMMETRIC: Final = int(ts.ENCRYPTION_TYPE.SYMMETRIC.value)

# TenSEALContextProto field numbers (tenseal/proto/tensealcontext.proto).
_CTX_PARMS, _CTX_PUBLIC, _CTX_PRIVATE, _CTX_ENC_TYPE = 1, 2, 3, 4
_PUB_PUBLIC_KEY, _PUB_AUTO_FLAGS, _PUB_SCALE, _PUB_RELIN, _PUB_GALOIS = 1, 2, 3, 4, 5
_PRIV_SECRET_KEY, _PRIV_RELIN_FLAG, _PRIV_GALOIS_FLAG = 1, 2, 3

_SEAL_ERRORS: Final = (ValueError, RuntimeError, IndexError, TypeError, OverflowError, MemoryError)
"""What pybind11 turns SEAL's C++ exceptions into."""


# --- SEAL objects to and from bytes ---------------------------------------------------------


class _MemFile:
    """An anonymous in-memory file that SEAL's path-based ``save``/``load`` can use."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("secagg-seal", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
            self._tmp: str | None = None
        else:  # pragma: no cover - non-Linux fallback
            self.fd, self._tmp = tempfile.mkstemp(prefix="secagg-seal-")
            self.path = self._tmp
            atexit.register(os.unlink, self._tmp)

    def dump(self, obj: Any) -> bytes:
        os.ftruncate(self.fd, 0)
        obj.save(self.path)
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0)
        if not size or len(data) != size:
            raise CryptoError("could not serialize a SEAL object")
        return data

    def wipe(self) -> None:
        """Drop the file's pages (after it held a secret key)."""
        os.ftruncate(self.fd, 0)

    def load(self, obj: Any, context: Any, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        obj.load(context, self.path)


_local = threading.local()


def _memfile() -> _MemFile:
    mf: _MemFile | None = getattr(_local, "memfile", None)
    if mf is None or mf.pid != os.getpid():
        mf = _MemFile()
        _local.memfile = mf
    return mf


# --- minimal protobuf (TenSEAL's context format) ------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_double(field: int, value: float) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<d", value)


def _pb_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Top-level fields of a protobuf message (varint, fixed64 and length-delimited only).

    Raises
    ------
    ConfigurationError
        If ``data`` is not a well-formed message.
    """
    fields: dict[int, list[bytes | int]] = {}
    pos, end = 0, len(data)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end or shift > 63:
                raise ConfigurationError("context bytes: truncated or overlong varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value = varint()
        elif wire == 1:
            if pos + 8 > end:
                raise ConfigurationError("context bytes: truncated fixed64")
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length = varint()
            if pos + length > end:
                raise ConfigurationError("context bytes: truncated field")
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ConfigurationError(f"context bytes: unsupported wire type {wire}")
        fields.setdefault(field, []).append(value)
    return fields


def _pb_message(fields: dict[int, list[bytes | int]], field: int) -> dict[int, list[bytes | int]]:
    values = fields.get(field, [])
    if not values:
        return {}
    last = values[-1]
    if not isinstance(last, bytes):
        raise ConfigurationError(f"context bytes: field {field} is not a message")
    return _pb_fields(last)


# --- contexts --------------------------------------------------------------------------------


def _seal_parameters(params: HEParams) -> Any:
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(
        sa.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    return parms


class _HEContext:
    """What every holder of a context needs: the SEAL context, an encoder and an evaluator."""

    def __init__(self, params: HEParams, context: Any) -> None:
        self.params = params
        self._ts = context
        self._seal = context.data.seal_context()
        self._encoder = sa.CKKSEncoder(self._seal)
        self._evaluator = sa.Evaluator(self._seal)
        self._first_parms_id = list(self._seal.first_parms_id())
        _check_context_matches(self._seal, float(context.global_scale), params)

    def _encode(self, values: npt.NDArray[np.float64]) -> Any:
        """Plaintext of ``N`` slot values: the first half in the real parts, the rest imaginary."""
        half = self.params.poly_modulus_degree // 2
        z = values[:half] + 1j * values[half:]
        plain = sa.Plaintext()
        self._encoder.encode(z.tolist(), self.params.scale, plain)
        return plain

    def _load_ciphertext(
        self, data: bytes, *, seeded: bool | None, client_id: int | None, index: int
    ) -> Any:
        """Parse one ciphertext after checking its length and header.

        ``seeded=None`` accepts both a client upload and a sum.
        """
        p = self.params
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedMessage(
                f"ciphertext {index}: expected bytes, got {type(data).__name__}",
                client_id=client_id,
            )
        data = bytes(data)
        kinds = (True, False) if seeded is None else (seeded,)
        ranges = [p.ciphertext_bytes_range(seeded=k) for k in kinds]
        if not any(lo <= len(data) <= hi for lo, hi in ranges):
            shown = " or ".join(f"[{lo}, {hi}]" for lo, hi in ranges)
            raise MalformedMessage(
                f"ciphertext {index}: {len(data)} bytes, expected {shown} for N="
                f"{p.poly_modulus_degree}, q={list(p.coeff_mod_bit_sizes)}",
                client_id=client_id,
            )
        magic, hsize, _major, _minor, compr, _res, size = SEAL_HEADER.unpack_from(data)
        if magic != SEAL_MAGIC or hsize != SEAL_HEADER.size or compr not in SEAL_COMPR_MODES:
            raise MalformedMessage(f"ciphertext {index}: not a SEAL object", client_id=client_id)
        if size != len(data):
            raise MalformedMessage(
                f"ciphertext {index}: header says {size} bytes, got {len(data)} (truncated?)",
                client_id=client_id,
            )
        ct = sa.Ciphertext()
        try:
            _memfile().load(ct, self._seal, data)
        except _SEAL_ERRORS as exc:
            raise MalformedMessage(
                f"ciphertext {index}: SEAL refused it ({exc}); wrong parameters or corrupted",
                client_id=client_id,
            ) from None
        if (
            ct.size() != 2
            or not ct.is_ntt_form()
            or ct.poly_modulus_degree() != p.poly_modulus_degree
            or ct.coeff_modulus_size() != p.data_primes
            or list(ct.parms_id()) != self._first_parms_id
            or ct.scale != p.scale
        ):
            raise MalformedMessage(
                f"ciphertext {index}: not a fresh-level ciphertext of scale 2^{p.scale_bits} "
                "under these parameters",
                client_id=client_id,
            )
        return ct

    def _dump(self, obj: Any) -> bytes:
        return _memfile().dump(obj)


class ServerContext(_HEContext):
    """The server's context: parameters only, no key of any kind. Sums ciphertexts."""


class SecretContext(_HEContext):
    """A key holder's context: encrypts (symmetric) and decrypts."""

    def __init__(self, params: HEParams, context: Any) -> None:
        super().__init__(params, context)
        key = context.data.secret_key()
        self._encryptor = sa.Encryptor(self._seal, key)
        self._decryptor = sa.Decryptor(self._seal, key)


def _check_context_matches(seal: Any, scale: float, params: HEParams) -> None:
    key_parms = seal.key_context_data().parms()
    n = int(key_parms.poly_modulus_degree())
    sizes = tuple(int(m.bit_count()) for m in key_parms.coeff_modulus())
    if n != params.poly_modulus_degree or sizes != params.coeff_mod_bit_sizes:
        raise ConfigurationError(
            f"context has N={n}, q={list(sizes)}; parameters want N="
            f"{params.poly_modulus_degree}, q={list(params.coeff_mod_bit_sizes)}"
        )
    if scale != params.scale:
        raise ConfigurationError(f"context scale {scale} differs from 2^{params.scale_bits}")


def make_secret_context(params: HEParams) -> bytes:
    """Generate a fresh secret key and return the key holders' context (TenSEAL format).

    The context is of TenSEAL's symmetric encryption type and holds the secret key only: no
    public, relinearisation or Galois key is ever generated (sums need none). Treat the bytes
    as the secret key.
    """
    parms = _seal_parameters(params)
    seal = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
    if not seal.parameters_set():
        raise ConfigurationError(f"SEAL refused the parameters: {seal.parameters_error_message()}")
    io = _memfile()
    secret_key = sa.KeyGenerator(seal).secret_key()
    public = _pb_double(_PUB_SCALE, params.scale)
    try:
        data = (
            _pb_bytes(_CTX_PARMS, io.dump(parms))
            + _pb_bytes(_CTX_PUBLIC, public)
            + _pb_bytes(_CTX_PRIVATE, _pb_bytes(_PRIV_SECRET_KEY, io.dump(secret_key)))
            + _pb_int(_CTX_ENC_TYPE, _SYMMETRIC)
        )
    finally:
        io.wipe()
    load_secret_context(data, params)  # round-trip check
    return data


def make_public_context(secret_context: bytes) -> bytes:
    """The server's context derived from the key holders' one: parameters and scale only.

    Serialized with ``save_public_key=False, save_secret_key=False, save_galois_keys=False,
    save_relin_keys=False``; :func:`load_server_context` re-checks that nothing secret is in.
    """
    _inspect_context(secret_context)
    ctx = _ts_load(secret_context)
    data = ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return bytes(data)


def _ts_load(data: bytes) -> Any:
    if not isinstance(data, bytes | bytearray):
        raise ConfigurationError(f"context must be bytes, got {type(data).__name__}")
    try:
        return ts.Context.load(bytes(data), n_threads=N_THREADS)
    except _SEAL_ERRORS as exc:
        raise ConfigurationError(f"not a TenSEAL context: {exc}") from None


def _inspect_context(
    data: bytes,
) -> tuple[dict[int, list[bytes | int]], dict[int, list[bytes | int]]]:
    """Check the context's shape from its bytes; return its private and public sub-messages."""
    top = _pb_fields(bytes(data))
    enc_type = top.get(_CTX_ENC_TYPE, [0])[-1]
    if enc_type != _SYMMETRIC:
        raise ConfigurationError("context must use TenSEAL's symmetric encryption type")
    public = _pb_message(top, _CTX_PUBLIC)
    for field, name in (
        (_PUB_PUBLIC_KEY, "a public key"),
        (_PUB_RELIN, "relinearisation keys"),
        (_PUB_GALOIS, "Galois keys"),
    ):
        if public.get(field):
            raise ConfigurationError(f"context carries {name}; aggregation needs none")
    private = _pb_message(top, _CTX_PRIVATE)
    for field in (_PRIV_RELIN_FLAG, _PRIV_GALOIS_FLAG):
        if private.get(field, [0])[-1]:
            raise ConfigurationError("context asks for key-switching keys; aggregation needs none")
    return private, public


def load_secret_context(data: bytes, params: HEParams) -> SecretContext:
    """Load the key holders' context (``n_threads=1``) and check it matches ``params``.

    Raises
    ------
    ConfigurationError
        If the bytes are not a symmetric TenSEAL context with a secret key for ``params``.
    """
    private, _ = _inspect_context(data)
    if not private.get(_PRIV_SECRET_KEY):
        raise ConfigurationError("context holds no secret key")
    ctx = _ts_load(data)
    if not ctx.is_private():
        raise ConfigurationError("context holds no secret key")
    return SecretContext(params, ctx)


def load_server_context(data: bytes, params: HEParams) -> ServerContext:
    """Load the server's context (``n_threads=1``); refuse one that carries any key.

    Raises
    ------
    ConfigurationError
        If the context carries a secret key (or public, relinearisation, Galois keys), or does
        not match ``params``.
    """
    private, _ = _inspect_context(data)
    if private:
        raise ConfigurationError("server context carries a secret key; refuse to load it")
    ctx = _ts_load(data)
    if ctx.is_private():  # cannot happen without a private sub-message; checked twice
        raise ConfigurationError("server context carries a secret key; refuse to load it")
    return ServerContext(params, ctx)


# --- lanes and masks ---------------------------------------------------------------------------


def _as_u64(values: npt.ArrayLike, what: str) -> U64Array:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{what} must be a flat vector, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must hold integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise InputError(f"{what} must be non-negative")
    return arr.astype(np.uint64)


def pack_lanes(values: npt.ArrayLike, params: HEParams) -> U64Array:
    """Pack ``params.n_values`` lane values into ``params.n_slots`` slot values, lane-major.

    With ``S`` slots, value ``j`` sits in slot ``j mod S`` at bit offset ``lane_bits * (j // S)``
    (the layout of :func:`secagg.quantize.pack` with ``lanes_per_slot`` lanes per word).

    Raises
    ------
    InputError
        If there are not ``n_values`` values, or one exceeds ``max_weight * (2^bits - 1)``.
    """
    v = _as_u64(values, "lane values")
    if v.size != params.n_values:
        raise InputError(f"expected {params.n_values} lane values, got {v.size}")
    if v.size and int(v.max()) > params.max_lane_value:
        raise InputError(f"lane values must be at most {params.max_lane_value}")
    slots = params.n_slots
    padded = np.zeros(slots * params.lanes_per_slot, dtype=np.uint64)
    padded[: v.size] = v
    out = np.zeros(slots, dtype=np.uint64)
    for lane in range(params.lanes_per_slot):
        out |= padded[lane * slots : (lane + 1) * slots] << np.uint64(lane * params.lane_bits)
    return out


def unpack_lanes(slots: npt.ArrayLike, params: HEParams, count: int | None = None) -> U64Array:
    """Inverse of :func:`pack_lanes`: the first ``count`` (default ``n_values``) lane values.

    Works on sums too (each lane sum fits its lane); in hybrid mode unmask first.
    """
    s = _as_u64(slots, "slot values")
    count = params.n_values if count is None else count
    per = params.lanes_per_slot
    if not 0 <= count <= s.size * per:
        raise ConfigurationError(f"{s.size} slots hold at most {s.size * per} values, not {count}")
    mask = np.uint64((1 << params.lane_bits) - 1)
    out = np.empty(s.size * per, dtype=np.uint64)
    for lane in range(per):
        out[lane * s.size : (lane + 1) * s.size] = (s >> np.uint64(lane * params.lane_bits)) & mask
    return out[:count]


def mask_modulus_bits(params: HEParams) -> int:
    """Hybrid mode: masks and masked slot values live modulo ``2^mask_modulus_bits(params)``.

    A whole slot value (``lanes_per_slot`` lanes) is masked at once, as the masked mode masks
    whole uint64 words: one carry headroom of ``ceil(log2(n + 1))`` bits per slot instead of
    one per lane.
    """
    if params.mode != "hybrid":
        raise ConfigurationError("masks exist in hybrid mode only")
    return params.mask_bits


def _mask_u64(params: HEParams) -> np.uint64:
    return np.uint64((1 << mask_modulus_bits(params)) - 1)


def masks_from_words(words: npt.ArrayLike, params: HEParams) -> U64Array:
    """Uniform masks modulo ``2^mask_bits`` from uniform uint64 words (e.g. a ChaCha20
    keystream of :func:`secagg.prg.keystream_u64`): the low ``mask_bits`` bits of each."""
    return _as_u64(words, "mask words") & _mask_u64(params)


def add_masks(slots: npt.ArrayLike, masks: npt.ArrayLike, params: HEParams) -> U64Array:
    """``(slots + masks) mod 2^mask_bits`` element-wise (uint64 wraps modulo 2^64 first)."""
    a, b = _as_u64(slots, "slot values"), _as_u64(masks, "masks")
    if a.shape != b.shape:
        raise InputError(f"slot values {a.shape} and masks {b.shape} differ in shape")
    return (a + b) & _mask_u64(params)


def negate_masks(masks: npt.ArrayLike, params: HEParams) -> U64Array:
    """``-masks mod 2^mask_bits``: what cancels ``masks`` in a sum."""
    return (np.uint64(0) - _as_u64(masks, "masks")) & _mask_u64(params)


def unmask_sum(slot_sums: npt.ArrayLike, params: HEParams) -> U64Array:
    """Reduce decrypted slot sums modulo ``2^mask_bits``: the masks cancel and, as no lane sum
    leaves its lane, what remains is the packed vector of lane sums."""
    return _as_u64(slot_sums, "slot sums") & _mask_u64(params)


# --- encrypt, sum, decrypt -----------------------------------------------------------------


def _check_slots(slots: npt.ArrayLike, params: HEParams, what: str) -> U64Array:
    v = _as_u64(slots, what)
    if v.size != params.n_slots:
        raise InputError(f"expected {params.n_slots} {what}, got {v.size}")
    if v.size and int(v.max()) >> params.slot_value_bits:
        raise InputError(f"{what} must be below 2^{params.slot_value_bits}")
    return v


def _chunks(values: U64Array, params: HEParams) -> Iterable[npt.NDArray[np.float64]]:
    n = params.slots_per_ciphertext
    padded = np.zeros(params.n_ciphertexts * n, dtype=np.float64)
    padded[: values.size] = values  # exact: values < 2^63 and checked < 2^value_bits <= 2^53
    for i in range(params.n_ciphertexts):
        yield padded[i * n : (i + 1) * n]


def encrypt(ctx: SecretContext, slots: npt.ArrayLike) -> list[bytes]:
    """Encrypt ``params.n_slots`` slot values (each below ``2^slot_value_bits``).

    Returns ``params.n_ciphertexts`` seeded symmetric ciphertexts (SEAL serializations, about
    ``8 N`` bytes each for a 60-bit modulus).

    Raises
    ------
    InputError
        If the vector has the wrong length or a value is out of range.
    """
    values = _check_slots(slots, ctx.params, "slot values")
    return [
        ctx._dump(ctx._encryptor.encrypt_symmetric(ctx._encode(c)))
        for c in _chunks(values, ctx.params)
    ]


class CiphertextSum:
    """Running sum of client uploads (server side), one client at a time.

    Parameters
    ----------
    ctx:
        The server's (or a key holder's) context.
    """

    def __init__(self, ctx: ServerContext | SecretContext) -> None:
        self._ctx = ctx
        self._acc: list[Any] | None = None
        self.count = 0

    def add(self, upload: Sequence[bytes], client_id: int | None = None) -> None:
        """Add one client's ciphertexts; all are checked before any is added.

        Raises
        ------
        MalformedMessage
            If the upload has the wrong number of ciphertexts or one is malformed (the sum is
            left unchanged; ``client_id`` is attached to the error).
        ConfigurationError
            If ``n_clients`` uploads were already added.
        """
        p = self._ctx.params
        if self.count >= p.n_clients:
            raise ConfigurationError(
                f"parameters allow {p.n_clients} summands; the noise bound would not hold"
            )
        if isinstance(upload, bytes | bytearray) or len(upload) != p.n_ciphertexts:
            got = "bytes" if isinstance(upload, bytes | bytearray) else str(len(upload))
            raise MalformedMessage(
                f"upload has {got} ciphertexts, expected {p.n_ciphertexts}", client_id=client_id
            )
        cts = [
            self._ctx._load_ciphertext(c, seeded=True, client_id=client_id, index=i)
            for i, c in enumerate(upload)
        ]
        self._accumulate(cts)
        self.count += 1

    def merge(self, partial: Sequence[bytes], count: int) -> None:
        """Add a partial sum of ``count`` uploads (the output of another :meth:`finish`).

        Used to shard a sum over processes; ``count`` is trusted (it comes from the server).

        Raises
        ------
        ConfigurationError
            If the total count would exceed ``n_clients`` or ``count < 1``.
        MalformedMessage
            If a ciphertext is malformed (the sum is left unchanged).
        """
        p = self._ctx.params
        if count < 1 or self.count + count > p.n_clients:
            raise ConfigurationError(
                f"cannot merge {count} summands into {self.count}: parameters allow "
                f"{p.n_clients}, the noise bound would not hold"
            )
        if isinstance(partial, bytes | bytearray) or len(partial) != p.n_ciphertexts:
            raise MalformedMessage(f"partial sum must have {p.n_ciphertexts} ciphertexts")
        cts = [
            self._ctx._load_ciphertext(c, seeded=False, client_id=None, index=i)
            for i, c in enumerate(partial)
        ]
        self._accumulate(cts)
        self.count += count

    def _accumulate(self, cts: list[Any]) -> None:
        if self._acc is None:
            self._acc = cts
        else:
            for acc, ct in zip(self._acc, cts, strict=True):
                self._ctx._evaluator.add_inplace(acc, ct)

    def finish(self, plain_addend: npt.ArrayLike | None = None) -> list[bytes]:
        """The serialized sum, with ``plain_addend`` (hybrid mode: slot values below
        ``2^mask_bits``, e.g. the negated masks of dropped clients) added.

        Raises
        ------
        ConfigurationError
            If nothing was added, or an addend is given in ckks mode (no headroom for it).
        InputError
            If the addend has the wrong length or range.
        """
        ctx, p = self._ctx, self._ctx.params
        if self._acc is None:
            raise ConfigurationError("no ciphertexts to sum")
        if plain_addend is not None:
            if p.mode != "hybrid":
                raise ConfigurationError("a plaintext addend is only allowed in hybrid mode")
            addend = _check_slots(plain_addend, p, "addend values")
            for acc, chunk in zip(self._acc, _chunks(addend, p), strict=True):
                ctx._evaluator.add_plain_inplace(acc, ctx._encode(chunk))
        out = [ctx._dump(acc) for acc in self._acc]
        self._acc = None
        self.count = 0
        return out


def sum_ciphertexts(
    ctx: ServerContext | SecretContext,
    uploads: Iterable[Sequence[bytes]],
    plain_addend: npt.ArrayLike | None = None,
) -> list[bytes]:
    """Sum client uploads (each ``params.n_ciphertexts`` ciphertexts) and an optional addend.

    A malformed upload raises :class:`~secagg.errors.MalformedMessage` with ``client_id`` set
    to its position in ``uploads``.
    """
    acc = CiphertextSum(ctx)
    for i, upload in enumerate(uploads):
        acc.add(upload, client_id=i)
    return acc.finish(plain_addend)


def decrypt(ctx: SecretContext, ciphertexts: Sequence[bytes], count: int | None = None) -> U64Array:
    """Decrypt a sum (or one upload) to integers: the first ``count`` slot values.

    Every decoded value, padding included, must lie within
    :data:`~secagg.he_params.ROUNDING_TOLERANCE` of an integer in ``[0, 2^slot_sum_bits)``,
    and padding must be zero; only the rounded integers are returned.

    Raises
    ------
    MalformedMessage
        If a ciphertext is malformed or there are not ``n_ciphertexts`` of them.
    DecryptionError
        If a value is off an integer (noise budget exceeded, another key, tampering) or out
        of range (an overflowing input).
    """
    p = ctx.params
    count = p.n_slots if count is None else count
    if not 0 <= count <= p.n_slots:
        raise ConfigurationError(f"count must be in 0..{p.n_slots}, got {count}")
    if isinstance(ciphertexts, bytes | bytearray) or len(ciphertexts) != p.n_ciphertexts:
        raise MalformedMessage(f"expected {p.n_ciphertexts} ciphertexts")
    parts = []
    plain = sa.Plaintext()
    for i, data in enumerate(ciphertexts):
        ct = ctx._load_ciphertext(data, seeded=None, client_id=None, index=i)
        ctx._decryptor.decrypt(ct, plain)
        z = np.asarray(ctx._encoder.decode_complex(plain), dtype=np.complex128)
        parts += [z.real, z.imag]
    decoded = np.concatenate(parts)
    rounded = np.rint(decoded)
    if not np.all(np.abs(decoded - rounded) <= ROUNDING_TOLERANCE):
        raise DecryptionError(
            f"decrypted values are not within {ROUNDING_TOLERANCE} of integers: noise budget "
            "exceeded, wrong key, or tampered ciphertext"
        )
    top = float(2**p.slot_sum_bits)
    if not (np.all(rounded >= 0) and np.all(rounded < top)):
        raise DecryptionError(
            f"decrypted values outside [0, 2^{p.slot_sum_bits}): an input overflowed its range"
        )
    if np.any(rounded[p.n_slots :]):
        raise DecryptionError("padding slots decrypted to non-zero values")
    return rounded[:count].astype(np.uint64)


# --- worker process ------------------------------------------------------------------------

(
    _OP_INIT,
    _OP_ENCRYPT,
    _OP_SUM_BEGIN,
    _OP_SUM_ADD,
    _OP_SUM_MERGE,
    _OP_SUM_FINISH,
    _OP_DECRYPT,
    _OP_CLOSE,
) = range(8)
_OK, _ERR = b"\x00", b"\x01"
_FRAMES = struct.Struct("<I")
_ERROR_TYPES: Final[dict[str, type[SecAggError]]] = {
    cls.__name__: cls
    for cls in (
        errors.ConfigurationError,
        errors.InfeasibleParameters,
        errors.InputError,
        errors.MalformedMessage,
        errors.DecryptionError,
        errors.CryptoError,
    )
}

Role = Literal["secret", "server"]


def _send(conn: Connection, frames: Sequence[bytes]) -> None:
    conn.send_bytes(_FRAMES.pack(len(frames)))
    for frame in frames:
        conn.send_bytes(frame)


def _recv(conn: Connection) -> list[bytes]:
    (n,) = _FRAMES.unpack(conn.recv_bytes(_FRAMES.size))
    return [conn.recv_bytes() for _ in range(n)]


def _u64_bytes(values: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(_as_u64(values, "values"), dtype="<u8").tobytes()


def _u64_from(data: bytes) -> U64Array:
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


class _WorkerState:
    def __init__(self, role: Role, params: HEParams, context: bytes) -> None:
        self.ctx: SecretContext | ServerContext = (
            load_secret_context(context, params)
            if role == "secret"
            else load_server_context(context, params)
        )
        self.acc: CiphertextSum | None = None

    def secret(self) -> SecretContext:
        if not isinstance(self.ctx, SecretContext):
            raise ConfigurationError("this worker holds the server context: no key")
        return self.ctx

    def handle(self, op: int, args: list[bytes]) -> list[bytes]:
        if op == _OP_ENCRYPT:
            return encrypt(self.secret(), _u64_from(args[0]))
        if op == _OP_SUM_BEGIN:
            self.acc = CiphertextSum(self.ctx)
            return []
        if op == _OP_SUM_ADD:
            if self.acc is None:
                raise ConfigurationError("sum not begun")
            cid = int(args[0]) if args[0] else None
            self.acc.add(args[1:], client_id=cid)
            return []
        if op == _OP_SUM_MERGE:
            if self.acc is None:
                raise ConfigurationError("sum not begun")
            self.acc.merge(args[1:], int(args[0]))
            return []
        if op == _OP_SUM_FINISH:
            if self.acc is None:
                raise ConfigurationError("sum not begun")
            acc, self.acc = self.acc, None
            return acc.finish(_u64_from(args[0]) if args else None)
        if op == _OP_DECRYPT:
            count = int(args[0])
            return [_u64_bytes(decrypt(self.secret(), args[1:], count))]
        raise ConfigurationError(f"unknown worker operation {op}")


def _worker_main(conn: Connection) -> None:
    """Entry point of the worker process: serve requests until closed."""
    state: _WorkerState | None = None
    while True:
        try:
            frames = _recv(conn)
        except (EOFError, OSError):
            return
        op = frames[0][0] if frames and frames[0] else -1
        try:
            if op == _OP_CLOSE:
                _send(conn, [_OK])
                return
            if op == _OP_INIT:
                role = cast(Role, frames[1].decode())
                state = _WorkerState(role, HEParams.from_json(frames[2]), frames[3])
                reply: list[bytes] = []
            elif state is None:
                raise ConfigurationError("worker not initialised")
            else:
                reply = state.handle(op, frames[1:])
            _send(conn, [_OK, *reply])
        except SecAggError as exc:
            cid = getattr(exc, "client_id", None)
            name = type(exc).__name__ if type(exc).__name__ in _ERROR_TYPES else "CryptoError"
            _send(
                conn, [_ERR, name.encode(), str(exc).encode(), b"" if cid is None else b"%d" % cid]
            )
        except Exception as exc:  # a bug or a SEAL failure: report, keep serving
            _send(
                conn,
                [_ERR, b"CryptoError", f"HE worker: {type(exc).__name__}: {exc}".encode(), b""],
            )


class HEWorker:
    """TenSEAL in a separate process (``spawn`` start method), driven by bytes-only messages.

    Parameters
    ----------
    params:
        The round's parameters.
    context:
        Context bytes: the key holders' (``role="secret"``) or the server's (``"server"``).
    role:
        Which context ``context`` is; a server worker cannot encrypt or decrypt.
    timeout:
        Seconds to wait for any answer before the worker is declared dead.

    Errors raised in the worker come back as the same :mod:`secagg.errors` class. Not
    thread-safe: one caller at a time.
    """

    def __init__(
        self, params: HEParams, context: bytes, *, role: Role, timeout: float = 300.0
    ) -> None:
        if role not in ("secret", "server"):
            raise ConfigurationError(f"role must be 'secret' or 'server', got {role!r}")
        self.params = params
        self._timeout = timeout
        mp = multiprocessing.get_context("spawn")
        self._conn, child = mp.Pipe(duplex=True)
        self._proc = mp.Process(target=_worker_main, args=(child,), daemon=True, name="he-worker")
        self._proc.start()
        child.close()
        try:
            self._call(_OP_INIT, [role.encode(), params.to_json(), bytes(context)])
        except BaseException:
            self.close()
            raise

    def _request(self, op: int, args: Sequence[bytes]) -> None:
        try:
            _send(self._conn, [bytes([op]), *args])
        except (OSError, ValueError) as exc:
            raise CryptoError(f"HE worker unreachable: {exc}") from None

    def _reply(self) -> list[bytes]:
        try:
            if not self._conn.poll(self._timeout):
                raise CryptoError(f"HE worker did not answer within {self._timeout} s")
            reply = _recv(self._conn)
        except (EOFError, OSError, ValueError) as exc:
            raise CryptoError(f"HE worker died: {exc}") from None
        if reply[0] == _OK:
            return reply[1:]
        cls = _ERROR_TYPES.get(reply[1].decode(), CryptoError)
        message = reply[2].decode()
        if issubclass(cls, errors.ProtocolViolation):
            raise cls(message, client_id=int(reply[3]) if reply[3] else None)
        raise cls(message)

    def _call(self, op: int, args: Sequence[bytes]) -> list[bytes]:
        self._request(op, args)
        return self._reply()

    def encrypt(self, slots: npt.ArrayLike) -> list[bytes]:
        """:func:`encrypt` in the worker."""
        return self._call(_OP_ENCRYPT, [_u64_bytes(slots)])

    def begin_sum(self) -> None:
        """Start a :class:`CiphertextSum` in the worker (dropping any unfinished one)."""
        self._call(_OP_SUM_BEGIN, [])

    def add_upload(self, upload: Sequence[bytes], client_id: int | None = None) -> None:
        """:meth:`CiphertextSum.add` in the worker."""
        self._request(_OP_SUM_ADD, _upload_frames(upload, client_id))
        self._reply()

    def merge_sum(self, partial: Sequence[bytes], count: int) -> None:
        """:meth:`CiphertextSum.merge` in the worker."""
        self._call(_OP_SUM_MERGE, [b"%d" % count, *(bytes(c) for c in partial)])

    def finish_sum(self, plain_addend: npt.ArrayLike | None = None) -> list[bytes]:
        """:meth:`CiphertextSum.finish` in the worker."""
        return self._call(
            _OP_SUM_FINISH, [] if plain_addend is None else [_u64_bytes(plain_addend)]
        )

    def sum_ciphertexts(
        self, uploads: Iterable[Sequence[bytes]], plain_addend: npt.ArrayLike | None = None
    ) -> list[bytes]:
        """:func:`sum_ciphertexts` in the worker."""
        self.begin_sum()
        for i, upload in enumerate(uploads):
            self.add_upload(upload, client_id=i)
        return self.finish_sum(plain_addend)

    def decrypt(self, ciphertexts: Sequence[bytes], count: int | None = None) -> U64Array:
        """:func:`decrypt` in the worker."""
        n = self.params.n_slots if count is None else count
        (data,) = self._call(_OP_DECRYPT, [b"%d" % n, *(bytes(c) for c in ciphertexts)])
        return _u64_from(data)

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        if self._proc.is_alive():
            try:
                _send(self._conn, [bytes([_OP_CLOSE])])
                if self._conn.poll(5.0):
                    _recv(self._conn)
            except (EOFError, OSError, ValueError):
                pass
            self._proc.join(5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()

    def __enter__(self) -> HEWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _upload_frames(upload: Sequence[bytes], client_id: int | None) -> list[bytes]:
    if isinstance(upload, bytes | bytearray):
        raise MalformedMessage("an upload is a sequence of ciphertexts", client_id=client_id)
    cid = b"" if client_id is None else b"%d" % client_id
    try:
        return [cid, *(bytes(c) for c in upload)]
    except TypeError:
        raise MalformedMessage("ciphertexts must be bytes", client_id=client_id) from None


class HEWorkerPool:
    """A server-side sum sharded over ``workers`` :class:`HEWorker` processes (one per core).

    Uploads go round-robin to the workers without waiting for the previous one to be added;
    :meth:`add_upload` and :meth:`drain` return the malformed uploads found meanwhile (each
    refused whole, its ``client_id`` attached), so the caller can treat those clients as
    dropped before it computes the hybrid-mode addend and calls :meth:`finish_sum`.

    Parameters
    ----------
    params:
        The round's parameters.
    public_context:
        The server's context bytes.
    workers:
        Number of processes.
    """

    def __init__(
        self, params: HEParams, public_context: bytes, *, workers: int = 2, timeout: float = 300.0
    ) -> None:
        if workers < 1:
            raise ConfigurationError(f"workers must be >= 1, got {workers}")
        self.params = params
        self._workers: list[HEWorker] = []
        try:
            for _ in range(workers):
                self._workers.append(
                    HEWorker(params, public_context, role="server", timeout=timeout)
                )
        except BaseException:
            self.close()
            raise
        self._pending = [False] * workers
        self._counts = [0] * workers
        self._next = 0
        self._open = False

    def begin_sum(self) -> None:
        """Start a new sum on every worker."""
        self.drain()
        for w in self._workers:
            w.begin_sum()
        self._counts = [0] * len(self._workers)
        self._open = True

    def _collect(self, i: int) -> list[MalformedMessage]:
        if not self._pending[i]:
            return []
        self._pending[i] = False
        try:
            self._workers[i]._reply()
        except MalformedMessage as exc:
            self._counts[i] -= 1
            return [exc]
        return []

    def add_upload(
        self, upload: Sequence[bytes], client_id: int | None = None
    ) -> list[MalformedMessage]:
        """Queue one client's upload; return the uploads refused since the last call."""
        if not self._open:
            raise ConfigurationError("sum not begun")
        frames = _upload_frames(upload, client_id)
        if sum(self._counts) >= self.params.n_clients:
            raise ConfigurationError(
                f"parameters allow {self.params.n_clients} summands; the noise bound would not hold"
            )
        i = self._next
        self._next = (i + 1) % len(self._workers)
        refused = self._collect(i)
        self._workers[i]._request(_OP_SUM_ADD, frames)
        self._pending[i] = True
        self._counts[i] += 1
        return refused

    def drain(self) -> list[MalformedMessage]:
        """Wait until every queued upload is added; return those refused."""
        refused: list[MalformedMessage] = []
        for i in range(len(self._workers)):
            refused += self._collect(i)
        return refused

    def finish_sum(self, plain_addend: npt.ArrayLike | None = None) -> list[bytes]:
        """Merge the workers' partial sums, add ``plain_addend``, return the ciphertexts.

        Raises
        ------
        MalformedMessage
            If an upload was refused and not yet collected with :meth:`drain`.
        """
        refused = self.drain()
        if refused:
            self._open = False
            raise refused[0]
        if not self._open:
            raise ConfigurationError("sum not begun")
        self._open = False
        active = [i for i, c in enumerate(self._counts) if c]
        if not active:
            raise ConfigurationError("no ciphertexts to sum")
        head, rest = active[0], active[1:]
        for i in rest:
            self._workers[head].merge_sum(self._workers[i].finish_sum(), self._counts[i])
        return self._workers[head].finish_sum(plain_addend)

    def sum_ciphertexts(
        self, uploads: Iterable[Sequence[bytes]], plain_addend: npt.ArrayLike | None = None
    ) -> list[bytes]:
        """:func:`sum_ciphertexts` over the pool: raises the first refused upload's error."""
        self.begin_sum()
        for i, upload in enumerate(uploads):
            refused = self.add_upload(upload, client_id=i)
            if refused:
                self.drain()
                self._open = False
                raise refused[0]
        return self.finish_sum(plain_addend)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        for w in self._workers:
            w.close()

    def __enter__(self) -> HEWorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
