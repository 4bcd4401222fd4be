"""TenSEAL in separate processes: :class:`HEWorker` and the server's :class:`HEWorkerPool`.

Each worker is a ``spawn``ed process speaking frames of bytes only (no pickle): op codes,
``HEParams.to_json()``, context bytes, little-endian uint64 arrays, ciphertexts, decimal ids.
Errors come back as the same :mod:`secagg.errors` class.
"""

from __future__ import annotations

import multiprocessing
import struct
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Final, Literal, cast

import numpy as np
import numpy.typing as npt

from secagg import errors
from secagg.ckks_budget import FileLedger
from secagg.ckks_context import (
    SecretContext,
    ServerContext,
    load_secret_context,
    load_server_context,
)
from secagg.ckks_lanes import U64Array, _as_u64
from secagg.ckks_ops import CiphertextSum, decrypt, encrypt
from secagg.errors import ConfigurationError, CryptoError, MalformedMessage, SecAggError
from secagg.he_params import HEParams

__all__ = ["HEWorker", "HEWorkerPool"]


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
        errors.DecryptionBudgetExhausted,
        errors.KeyEpochMismatch,
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
    def __init__(
        self, role: Role, params: HEParams, context: bytes, ledger: str | None = None
    ) -> None:
        self.ctx: SecretContext | ServerContext = (
            load_secret_context(context, params, ledger=FileLedger(ledger) if ledger else None)
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
                ledger = frames[4].decode() if len(frames) > 4 and frames[4] else None
                state = _WorkerState(role, HEParams.from_json(frames[2]), frames[3], ledger)
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
    ledger_path:
        ``role="secret"``: count decryptions in this :class:`~secagg.ckks_budget.FileLedger`
        (e.g. :func:`~secagg.ckks_budget.ledger_path_for` of the secret file) rather than in
        the worker's memory, so a restarted worker does not start the count again.

    Errors raised in the worker come back as the same :mod:`secagg.errors` class. Not
    thread-safe: one caller at a time.
    """

    def __init__(
        self,
        params: HEParams,
        context: bytes,
        *,
        role: Role,
        timeout: float = 300.0,
        ledger_path: str | Path | None = None,
    ) -> None:
        if role not in ("secret", "server"):
            raise ConfigurationError(f"role must be 'secret' or 'server', got {role!r}")
        if ledger_path is not None and role != "secret":
            raise ConfigurationError("only a secret worker decrypts: no ledger for the server")
        self.params = params
        self._timeout = timeout
        mp = multiprocessing.get_context("spawn")
        self._conn, child = mp.Pipe(duplex=True)
        self._proc = mp.Process(target=_worker_main, args=(child,), daemon=True, name="he-worker")
        self._proc.start()
        child.close()
        try:
            ledger = b"" if ledger_path is None else str(Path(ledger_path).resolve()).encode()
            self._call(_OP_INIT, [role.encode(), params.to_json(), bytes(context), ledger])
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
