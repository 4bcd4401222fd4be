"""Encrypt, sum and decrypt (in process): the operations of the ``ckks`` and ``hybrid`` modes.

Clients encrypt with the shared secret key (:func:`encrypt`): symmetric CKKS, both parts of
each complex slot used, the second polynomial replaced by its 64-byte PRNG seed. The server
adds ciphertexts and an optional plaintext (:class:`CiphertextSum`) with a keyless context.
Key holders decrypt (:func:`decrypt`) to integers only, each decryption charged to the
context's decryption budget first (``docs/ckks.md``, "Decryption budget").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from tenseal import sealapi as sa

from secagg.ckks_context import SecretContext, ServerContext
from secagg.ckks_lanes import U64Array, _as_u64
from secagg.errors import ConfigurationError, DecryptionError, InputError, MalformedMessage
from secagg.he_params import ROUNDING_TOLERANCE, HEParams

__all__ = ["CiphertextSum", "decrypt", "encrypt", "sum_ciphertexts"]


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


def decrypt(
    ctx: SecretContext,
    ciphertexts: Sequence[bytes],
    count: int | None = None,
    *,
    bound_bits: int | None = None,
) -> U64Array:
    """Decrypt a sum (or one upload) to integers: the first ``count`` slot values.

    Every decoded value, padding included, must lie within
    :data:`~secagg.he_params.ROUNDING_TOLERANCE` of an integer in ``[0, 2^slot_sum_bits)``,
    and padding must be zero; only the rounded integers are returned. ``bound_bits`` lowers the
    range to ``[0, 2^bound_bits)`` (one hybrid upload: ``mask_bits``).

    Each call that gets past the ciphertext checks is charged to ``ctx``'s decryption budget
    before it decrypts, whether it then accepts or aborts: the accept/abort is what leaks.

    Raises
    ------
    MalformedMessage
        If a ciphertext is malformed or there are not ``n_ciphertexts`` of them (no charge).
    DecryptionBudgetExhausted
        If the context's key epoch has no decryption left (nothing is decrypted).
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
    top_bits = p.slot_sum_bits if bound_bits is None else bound_bits
    if not 0 < top_bits <= p.slot_sum_bits:
        raise ConfigurationError(f"bound_bits must be in 1..{p.slot_sum_bits}, got {top_bits}")
    cts = [
        ctx._load_ciphertext(c, seeded=None, client_id=None, index=i)
        for i, c in enumerate(ciphertexts)
    ]
    ctx.charge_decryption()  # count first, then decrypt: a crash never saves a charge
    parts = []
    plain = sa.Plaintext()
    for ct in cts:
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
    top = float(2**top_bits)
    if not (np.all(rounded >= 0) and np.all(rounded < top)):
        raise DecryptionError(
            f"decrypted values outside [0, 2^{top_bits}): an input overflowed its range"
        )
    if np.any(rounded[p.n_slots :]):
        raise DecryptionError("padding slots decrypted to non-zero values")
    return rounded[:count].astype(np.uint64)
