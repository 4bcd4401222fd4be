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

The implementation is split by concept; this module re-exports the public names:
:mod:`secagg.ckks_lanes` (lane encoding and hybrid masks), :mod:`secagg.ckks_seal` (SEAL
serialization), :mod:`secagg.ckks_context` (contexts and key epochs, read with the protobuf
code generated into :mod:`secagg._gen` from TenSEAL's ``tensealcontext.proto``),
:mod:`secagg.ckks_budget` (decryption budgets), :mod:`secagg.ckks_ops` (encrypt, sum,
decrypt) and :mod:`secagg.ckks_worker` (worker processes).
"""

from __future__ import annotations

from secagg.ckks_budget import (
    DEFAULT_DECRYPTION_BUDGET,
    MAX_DECRYPTION_BUDGET,
    FileLedger,
    KeyEpoch,
    Ledger,
    MemoryLedger,
    ledger_path_for,
)
from secagg.ckks_context import (
    SecretContext,
    ServerContext,
    load_secret_context,
    load_server_context,
    make_public_context,
    make_secret_context,
    open_secret_context,
)
from secagg.ckks_lanes import (
    U64Array,
    add_masks,
    mask_modulus_bits,
    masks_from_words,
    negate_masks,
    pack_lanes,
    unmask_sum,
    unpack_lanes,
)
from secagg.ckks_ops import CiphertextSum, decrypt, encrypt, sum_ciphertexts
from secagg.ckks_seal import N_THREADS, SEAL_COMPR_MODES, SEAL_HEADER, SEAL_MAGIC
from secagg.ckks_worker import HEWorker, HEWorkerPool

__all__ = [
    "DEFAULT_DECRYPTION_BUDGET",
    "MAX_DECRYPTION_BUDGET",
    "CiphertextSum",
    "FileLedger",
    "HEWorker",
    "HEWorkerPool",
    "KeyEpoch",
    "Ledger",
    "MemoryLedger",
    "SecretContext",
    "ServerContext",
    "add_masks",
    "decrypt",
    "encrypt",
    "ledger_path_for",
    "load_secret_context",
    "load_server_context",
    "make_public_context",
    "make_secret_context",
    "mask_modulus_bits",
    "masks_from_words",
    "negate_masks",
    "open_secret_context",
    "pack_lanes",
    "sum_ciphertexts",
    "unmask_sum",
    "unpack_lanes",
]


_ = (U64Array, N_THREADS, SEAL_COMPR_MODES, SEAL_HEADER, SEAL_MAGIC)
