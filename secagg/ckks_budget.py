"""Key epochs and decryption budgets of CKKS key holders.

A CKKS decryption that accepts or aborts tells whoever chose the ciphertext up to one bit
about the secret key's noise (Li and Micciancio, EUROCRYPT 2021, IND-CPA-D), even though
:func:`secagg.ckks.decrypt` returns rounded integers only. Each secret context therefore
belongs to a *key epoch* (:class:`KeyEpoch`: an epoch number, a random key id and a budget)
and every decryption is charged to a :class:`Ledger` **before** it runs. Past the budget the
key holder refuses (:class:`~secagg.errors.DecryptionBudgetExhausted`) and the operator
rotates the key. The bound is argued in ``docs/ckks.md`` ("Decryption budget").

:class:`MemoryLedger` counts for one loaded context; :class:`FileLedger` counts in a small
JSON file beside the secret context file, shared by every process that opens it: the count is
written (temporary file, ``fsync``, ``os.replace``) under an exclusive lock before the
decryption, so a crash can lose a decryption but never a charge.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from secagg.errors import ConfigurationError, DecryptionBudgetExhausted, KeyEpochMismatch

__all__ = [
    "DEFAULT_DECRYPTION_BUDGET",
    "KEY_ID_BYTES",
    "MAX_DECRYPTION_BUDGET",
    "FileLedger",
    "KeyEpoch",
    "Ledger",
    "MemoryLedger",
    "ledger_path_for",
]

SECURITY_BITS: Final = 128
"""Security target of every parameter set (HomomorphicEncryption.org standard, 128-bit)."""

MAX_DECRYPTION_BUDGET: Final = 64
"""Most decryptions per key holder and key epoch: at most 64 leaked bits keep at least
``128 - 64 = 64`` bits of security even against an attacker who turns every bit into a halving
of its search (the generic guessing bound, ``docs/ckks.md``)."""

DEFAULT_DECRYPTION_BUDGET: Final = 32
"""Default decryptions per key holder and key epoch: at least 96 bits of security remain by the
same bound (one round costs each key holder one decryption, a hybrid blame check one more per
upload checked)."""

KEY_ID_BYTES: Final = 16
"""Random key id of an epoch (fresh for every ``make_secret_context``): 128 bits, no collisions."""

LEDGER_FORMAT: Final = "secagg-ckks-ledger"


@dataclass(frozen=True)
class KeyEpoch:
    """The key epoch of a CKKS context.

    Parameters
    ----------
    epoch:
        Operator-chosen epoch number (``secagg keygen --ckks --epoch``), 0 and up.
    key_id:
        :data:`KEY_ID_BYTES` random bytes drawn when the key was generated.
    budget:
        Decryptions each key holder may make under this key.
    """

    epoch: int
    key_id: bytes
    budget: int

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < 2**63:
            raise ConfigurationError(f"key epoch must be in 0..2^63-1, got {self.epoch}")
        if len(self.key_id) != KEY_ID_BYTES:
            raise ConfigurationError(f"key id must be {KEY_ID_BYTES} bytes, got {len(self.key_id)}")
        if not 1 <= self.budget <= MAX_DECRYPTION_BUDGET:
            raise ConfigurationError(
                f"decryption budget must be in 1..{MAX_DECRYPTION_BUDGET}, got {self.budget}"
            )

    @classmethod
    def fresh(cls, epoch: int = 0, budget: int = DEFAULT_DECRYPTION_BUDGET) -> KeyEpoch:
        """A new epoch with a random key id (from :mod:`secrets`)."""
        return cls(epoch, secrets.token_bytes(KEY_ID_BYTES), budget)

    @property
    def fingerprint(self) -> bytes:
        """16 bytes naming the key (epoch number and key id, not the budget): what rounds bind."""
        data = b"secagg/v1/ckks-epoch" + self.epoch.to_bytes(8, "big") + self.key_id
        return hashlib.sha256(data).digest()[:16]

    def describe(self) -> dict[str, object]:
        return {"epoch": self.epoch, "key_id": self.key_id.hex(), "budget": self.budget}


LEGACY_EPOCH: Final = KeyEpoch(0, bytes(KEY_ID_BYTES), DEFAULT_DECRYPTION_BUDGET)
"""The epoch of a context written before epochs existed: epoch 0, a zero key id, the default
budget."""


class Ledger(Protocol):
    """Where a key holder's decryptions are counted."""

    def spend(self, epoch: KeyEpoch) -> int:
        """Charge one decryption under ``epoch``; return the decryptions left afterwards.

        Raises
        ------
        DecryptionBudgetExhausted
            If ``epoch.budget`` decryptions were already charged (nothing is charged).
        KeyEpochMismatch
            If the ledger counts for another key epoch.
        """
        ...

    def spent(self, epoch: KeyEpoch) -> int:
        """Decryptions charged so far under ``epoch``."""
        ...


def _exhausted(epoch: KeyEpoch) -> DecryptionBudgetExhausted:
    return DecryptionBudgetExhausted(
        f"decryption budget of CKKS key epoch {epoch.epoch} spent ({epoch.budget} of "
        f"{epoch.budget}): rotate the key (secagg keygen --ckks --epoch {epoch.epoch + 1})"
    )


class MemoryLedger:
    """Counts the decryptions of one loaded context (lost when the process ends)."""

    def __init__(self) -> None:
        self._spent: dict[bytes, int] = {}

    def spent(self, epoch: KeyEpoch) -> int:
        return self._spent.get(epoch.fingerprint, 0)

    def spend(self, epoch: KeyEpoch) -> int:
        used = self.spent(epoch)
        if used >= epoch.budget:
            raise _exhausted(epoch)
        self._spent[epoch.fingerprint] = used + 1
        return epoch.budget - used - 1


def ledger_path_for(secret_path: str | Path) -> Path:
    """The ledger file beside a secret context file: ``PATH.ledger``."""
    p = Path(secret_path)
    return p.with_name(p.name + ".ledger")


class FileLedger:
    """Counts decryptions in a JSON file shared by every process that opens the key.

    ``{"format": "secagg-ckks-ledger", "fingerprint": hex, "epoch": E, "spent": k}``; a
    missing file counts as ``spent = 0``. Updates hold an exclusive ``flock`` on
    ``PATH.lock`` and replace the file atomically (temporary file, ``fsync``, ``os.replace``,
    directory ``fsync``) before the decryption they pay for.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self, epoch: KeyEpoch) -> int:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0
        try:
            doc = json.loads(text)
            if doc.get("format") != LEDGER_FORMAT:
                raise ValueError("not a secagg CKKS ledger")
            fingerprint, used = bytes.fromhex(doc["fingerprint"]), int(doc["spent"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"{self.path}: malformed decryption ledger ({exc})") from None
        if fingerprint != epoch.fingerprint:
            raise KeyEpochMismatch(
                f"{self.path} counts decryptions of another CKKS key (epoch "
                f"{doc.get('epoch')}); this key is epoch {epoch.epoch}"
            )
        if used < 0:
            raise ConfigurationError(f"{self.path}: negative decryption count {used}")
        return used

    def _write(self, epoch: KeyEpoch, used: int) -> None:
        doc = {
            "format": LEDGER_FORMAT,
            "fingerprint": epoch.fingerprint.hex(),
            "epoch": epoch.epoch,
            "budget": epoch.budget,
            "spent": used,
        }
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (json.dumps(doc) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def reset(self, epoch: KeyEpoch) -> None:
        """Start a fresh count for a newly generated key (``keygen`` calls this)."""
        with self._locked():
            self._write(epoch, 0)

    def spent(self, epoch: KeyEpoch) -> int:
        with self._locked():
            return self._read(epoch)

    def spend(self, epoch: KeyEpoch) -> int:
        with self._locked():
            used = self._read(epoch)
            if used >= epoch.budget:
                raise _exhausted(epoch)
            self._write(epoch, used + 1)
        return epoch.budget - used - 1
