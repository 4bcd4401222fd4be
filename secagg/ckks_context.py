"""CKKS contexts: the key holders' (secret key) and the server's (no key), their key epoch.

Contexts are TenSEAL's format (``tenseal.Context``, symmetric encryption type,
``n_threads=1``); the key epoch (:class:`KeyEpoch`) travels in the same protobuf under a field
number TenSEAL does not use, so the files stay loadable by ``tenseal.Context.load``. Files are
read and written with the messages generated into :mod:`secagg._gen` from TenSEAL's
``tensealcontext.proto`` and ``secagg/proto/ckks_context.proto``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import tenseal as ts
from google.protobuf.message import DecodeError
from tenseal import sealapi as sa

from secagg._gen import ckks_context_pb2 as pb
from secagg._gen import tensealcontext_pb2 as tenseal_pb
from secagg.ckks_budget import (
    DEFAULT_DECRYPTION_BUDGET,
    KEY_ID_BYTES,
    LEGACY_EPOCH,
    FileLedger,
    KeyEpoch,
    Ledger,
    MemoryLedger,
    ledger_path_for,
)
from secagg.ckks_seal import (
    _SEAL_ERRORS,
    _SYMMETRIC,
    N_THREADS,
    SEAL_COMPR_MODES,
    SEAL_HEADER,
    SEAL_MAGIC,
    _memfile,
)
from secagg.errors import ConfigurationError, DecryptionBudgetExhausted, MalformedMessage
from secagg.he_params import HEParams

__all__ = [
    "SecretContext",
    "ServerContext",
    "load_secret_context",
    "load_server_context",
    "make_public_context",
    "make_secret_context",
    "open_secret_context",
]

EPOCH_RECORD_VERSION: Final = 1
"""Version of the ``KeyEpoch`` record (``secagg/proto/ckks_context.proto``)."""


def _epoch_message(epoch: KeyEpoch) -> pb.KeyEpoch:
    return pb.KeyEpoch(
        version=EPOCH_RECORD_VERSION, epoch=epoch.epoch, key_id=epoch.key_id, budget=epoch.budget
    )


def _parse(data: bytes) -> pb.ContextFile:
    if not isinstance(data, bytes | bytearray):
        raise ConfigurationError(f"context must be bytes, got {type(data).__name__}")
    try:
        return pb.ContextFile.FromString(bytes(data))
    except DecodeError as exc:
        raise ConfigurationError(f"context bytes: not a context protobuf ({exc})") from None


def _read_epoch(msg: pb.ContextFile) -> KeyEpoch:
    """The context's key epoch; :data:`~secagg.ckks_budget.LEGACY_EPOCH` when it has none."""
    if not msg.HasField("key_epoch"):
        return LEGACY_EPOCH
    rec = msg.key_epoch
    if rec.version != EPOCH_RECORD_VERSION:
        raise ConfigurationError(f"context's key epoch record has unknown version {rec.version}")
    if len(rec.key_id) != KEY_ID_BYTES:
        raise ConfigurationError("context's key epoch record has no valid key id")
    return KeyEpoch(rec.epoch, rec.key_id, rec.budget)


def _seal_parameters(params: HEParams) -> Any:
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(
        sa.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    return parms


class _HEContext:
    """What every holder of a context needs: the SEAL context, an encoder and an evaluator."""

    def __init__(self, params: HEParams, context: Any, epoch: KeyEpoch = LEGACY_EPOCH) -> None:
        self.params = params
        self.epoch = epoch
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
    """The server's context: parameters and key epoch only, no key of any kind. Sums
    ciphertexts."""


class SecretContext(_HEContext):
    """A key holder's context: encrypts (symmetric) and decrypts, each decryption charged to
    :attr:`ledger` first (at most ``epoch.budget`` of them)."""

    def __init__(
        self,
        params: HEParams,
        context: Any,
        epoch: KeyEpoch = LEGACY_EPOCH,
        ledger: Ledger | None = None,
    ) -> None:
        super().__init__(params, context, epoch)
        self.ledger: Ledger = MemoryLedger() if ledger is None else ledger
        key = context.data.secret_key()
        self._encryptor = sa.Encryptor(self._seal, key)
        self._decryptor = sa.Decryptor(self._seal, key)

    def key_holder(self) -> SecretContext:
        """Another key holder of the same key in this process (simulations): it shares the
        SEAL objects and counts its own decryptions in a fresh
        :class:`~secagg.ckks_budget.MemoryLedger`."""
        other = copy.copy(self)
        other.ledger = MemoryLedger()
        return other

    @property
    def decryptions_left(self) -> int:
        """Decryptions this key holder may still make in its key epoch."""
        return max(0, self.epoch.budget - self.ledger.spent(self.epoch))

    def require_budget(self, needed: int = 1) -> None:
        """Refuse up front when fewer than ``needed`` decryptions are left.

        Raises
        ------
        DecryptionBudgetExhausted
            If the ledger has fewer than ``needed`` decryptions left.
        """
        left = self.decryptions_left
        if left < needed:
            raise DecryptionBudgetExhausted(
                f"CKKS key epoch {self.epoch.epoch} has {left} of {self.epoch.budget} "
                f"decryptions left, {needed} needed: rotate the key "
                f"(secagg keygen --ckks --epoch {self.epoch.epoch + 1})"
            )

    def charge_decryption(self) -> int:
        """Charge one decryption to the ledger (before decrypting); return how many are left."""
        return self.ledger.spend(self.epoch)


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


def make_secret_context(
    params: HEParams, *, epoch: int = 0, decryption_budget: int = DEFAULT_DECRYPTION_BUDGET
) -> bytes:
    """Generate a fresh secret key and return the key holders' context (TenSEAL format).

    The context is of TenSEAL's symmetric encryption type and holds the secret key only: no
    public, relinearisation or Galois key is ever generated (sums need none). It carries a new
    :class:`~secagg.ckks_budget.KeyEpoch` (``epoch``, a random key id, ``decryption_budget``
    decryptions per key holder). Treat the bytes as the secret key.
    """
    key_epoch = KeyEpoch.fresh(epoch, decryption_budget)
    parms = _seal_parameters(params)
    seal = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
    if not seal.parameters_set():
        raise ConfigurationError(f"SEAL refused the parameters: {seal.parameters_error_message()}")
    io = _memfile()
    secret_key = sa.KeyGenerator(seal).secret_key()
    try:
        msg = pb.ContextFile(
            encryption_parameters=io.dump(parms),
            public_context=tenseal_pb.TenSEALPublicProto(scale=params.scale),
            private_context=tenseal_pb.TenSEALPrivateProto(secret_key=io.dump(secret_key)),
            encryption_type=_SYMMETRIC,
            key_epoch=_epoch_message(key_epoch),
        )
        data = msg.SerializeToString()
        del msg
    finally:
        io.wipe()
    load_secret_context(data, params)  # round-trip check
    return data


def make_public_context(secret_context: bytes) -> bytes:
    """The server's context derived from the key holders' one: parameters, scale, key epoch.

    Serialized with ``save_public_key=False, save_secret_key=False, save_galois_keys=False,
    save_relin_keys=False``; :func:`load_server_context` re-checks that nothing secret is in.
    """
    _, epoch = _inspect_context(secret_context)
    ctx = _ts_load(secret_context)
    data = ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    if epoch is LEGACY_EPOCH:
        return bytes(data)
    out = _parse(bytes(data))
    out.key_epoch.CopyFrom(_epoch_message(epoch))
    return out.SerializeToString()


def _ts_load(data: bytes) -> Any:
    if not isinstance(data, bytes | bytearray):
        raise ConfigurationError(f"context must be bytes, got {type(data).__name__}")
    try:
        return ts.Context.load(bytes(data), n_threads=N_THREADS)
    except _SEAL_ERRORS as exc:
        raise ConfigurationError(f"not a TenSEAL context: {exc}") from None


def _inspect_context(data: bytes) -> tuple[pb.ContextFile, KeyEpoch]:
    """Check the context's shape from its bytes (the reader generated from TenSEAL's
    ``tensealcontext.proto``); return the parsed message and its key epoch."""
    msg = _parse(data)
    if msg.encryption_type != _SYMMETRIC:
        raise ConfigurationError("context must use TenSEAL's symmetric encryption type")
    public = msg.public_context
    for present, name in (
        (public.public_key, "a public key"),
        (public.relin_keys, "relinearisation keys"),
        (public.galois_keys, "Galois keys"),
    ):
        if present:
            raise ConfigurationError(f"context carries {name}; aggregation needs none")
    private = msg.private_context
    if private.relin_keys_generated or private.galois_keys_generated:
        raise ConfigurationError("context asks for key-switching keys; aggregation needs none")
    return msg, _read_epoch(msg)


def load_secret_context(
    data: bytes, params: HEParams, *, ledger: Ledger | None = None
) -> SecretContext:
    """Load the key holders' context (``n_threads=1``) and check it matches ``params``.

    Decryptions are counted in ``ledger`` (default: a fresh
    :class:`~secagg.ckks_budget.MemoryLedger`, which forgets when the object goes;
    :func:`open_secret_context` counts in a file that survives the process).

    Raises
    ------
    ConfigurationError
        If the bytes are not a symmetric TenSEAL context with a secret key for ``params``.
    """
    msg, epoch = _inspect_context(data)
    if not msg.private_context.secret_key:
        raise ConfigurationError("context holds no secret key")
    del msg
    ctx = _ts_load(data)
    if not ctx.is_private():
        raise ConfigurationError("context holds no secret key")
    return SecretContext(params, ctx, epoch, ledger)


def open_secret_context(path: str | Path, params: HEParams) -> SecretContext:
    """Load a secret context file whose decryptions count in the ledger file beside it
    (``PATH.ledger``, :class:`~secagg.ckks_budget.FileLedger`), shared across processes.

    Raises
    ------
    ConfigurationError
        If the file is not a secret context for ``params``, or is readable by other users.
    KeyEpochMismatch
        If the ledger beside it counts for another key.
    """
    p = Path(path)
    if os.name == "posix" and p.stat().st_mode & 0o077:
        raise ConfigurationError(f"{p} is readable by other users; chmod 600 it")
    ctx = load_secret_context(p.read_bytes(), params, ledger=FileLedger(ledger_path_for(p)))
    ctx.ledger.spent(ctx.epoch)  # a ledger of another key is refused now, not at decryption
    return ctx


def load_server_context(data: bytes, params: HEParams) -> ServerContext:
    """Load the server's context (``n_threads=1``); refuse one that carries any key.

    Raises
    ------
    ConfigurationError
        If the context carries a secret key (or public, relinearisation, Galois keys), or does
        not match ``params``.
    """
    msg, epoch = _inspect_context(data)
    if msg.HasField("private_context"):
        raise ConfigurationError("server context carries a secret key; refuse to load it")
    ctx = _ts_load(data)
    if ctx.is_private():  # cannot happen without a private sub-message; checked twice
        raise ConfigurationError("server context carries a secret key; refuse to load it")
    return ServerContext(params, ctx, epoch)
