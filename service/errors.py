"""Service-level errors, the one table that maps every error to a gRPC status, and the
one table of ``secagg`` exit codes.

The service errors extend :class:`secagg.errors.SecAggError`, so the package keeps one
hierarchy. :func:`status_for` is the only place an exception becomes a status code; the
servicer calls it, the client SDK relies on the codes it produces. :func:`exit_code_for` is
the only place an exception becomes an exit status of the command line (docs/operations.md,
"Exit codes", lists the same table).
"""

from __future__ import annotations

import grpc

from secagg.errors import (
    ConfigurationError,
    DuplicateMessage,
    InputError,
    InvalidSignature,
    LateMessage,
    MalformedMessage,
    ProtocolViolation,
    RoundAborted,
    SecAggError,
    StoreError,
    UnexpectedMessage,
    UnknownClient,
    WrongSession,
)

__all__ = [
    "EXIT_ABORTED",
    "EXIT_AUDIT",
    "EXIT_CODES",
    "EXIT_CONFIG",
    "EXIT_DENIED",
    "EXIT_ERROR",
    "EXIT_LOCKED",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "AlreadyExists",
    "Dropped",
    "HelloTimeout",
    "JobAborted",
    "JobTimeout",
    "NotFound",
    "PermissionDenied",
    "PolicyRefused",
    "Refused",
    "RemoteError",
    "ServiceError",
    "StoreLocked",
    "TlsError",
    "TooLarge",
    "TooManyStreams",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "exit_code_for",
    "from_rpc_error",
    "status_for",
]


class ServiceError(SecAggError):
    """A request the service refuses before it reaches the protocol core."""


class Unauthenticated(ServiceError):
    """Missing, malformed, stale, replayed or invalid call credentials; unknown identity."""


class PermissionDenied(ServiceError):
    """An authenticated caller asks for something it may not do (revoked, not invited)."""


class NotFound(ServiceError):
    """No such round, job or participant."""


class AlreadyExists(ServiceError):
    """A participant name or key that is already enrolled; a job with a running round."""


class TooLarge(ServiceError):
    """A frame or message over its bound; refused before anything is allocated."""


class TooManyStreams(ServiceError):
    """A participant opened more ``Session`` streams in one round than the server allows."""


class HelloTimeout(ServiceError):
    """A ``Session`` stream sent no ``Hello`` within the server's ``hello_timeout``."""


class Unimplemented(ServiceError):
    """A mode the service does not run (yet)."""


class Refused(ServiceError):
    """A call or message the round's current state does not allow (FAILED_PRECONDITION)."""


class Dropped(Refused):
    """The caller was dropped from the round; the message says at which stage and why."""


class PolicyRefused(ServiceError):
    """The client refuses a round whose parameters or directory break its policy."""


class RemoteError(ServiceError):
    """A call failed with a status no more specific class covers; ``code`` is that status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class Unavailable(RemoteError):
    """The server cannot be reached (nothing listens, the network is down): transient."""

    code = grpc.StatusCode.UNAVAILABLE


class TlsError(Unavailable, ConfigurationError):
    """A TLS failure no retry fixes: untrusted or expired certificate, wrong server name,
    a client certificate the server refuses, a certificate and key that do not match."""


class JobAborted(ServiceError):
    """The job was aborted (by an operator, or by the server when a round could not open):
    no further round of it opens. ``reason`` is what the server gave."""

    def __init__(self, job: str, reason: str) -> None:
        super().__init__(f"job {job!r} was aborted: {reason or 'no reason given'}")
        self.job = job
        self.reason = reason


class JobTimeout(ServiceError, TimeoutError):
    """No round of the job opened within the ``timeout`` the caller gave."""


class StoreLocked(StoreError):
    """Another server holds the store's writer lock; the message names it (pid, host)."""


_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    # Order matters: the first matching class wins, so subclasses come first.
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (HelloTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (JobTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (JobAborted, grpc.StatusCode.ABORTED),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (DuplicateMessage, grpc.StatusCode.ALREADY_EXISTS),
    (UnknownClient, grpc.StatusCode.PERMISSION_DENIED),
    (WrongSession, grpc.StatusCode.FAILED_PRECONDITION),
    (LateMessage, grpc.StatusCode.FAILED_PRECONDITION),
    (UnexpectedMessage, grpc.StatusCode.FAILED_PRECONDITION),
    (MalformedMessage, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidSignature, grpc.StatusCode.INVALID_ARGUMENT),
    (ProtocolViolation, grpc.StatusCode.INVALID_ARGUMENT),
    (RoundAborted, grpc.StatusCode.ABORTED),
    (ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.INTERNAL),
    (SecAggError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for ``exc``.

    Protocol violations name the stage and whether the sender was dropped, so a client can
    tell "fix and retry" from "you are out of this round". Unknown exceptions become
    ``INTERNAL`` with the class name only (no internals leak to the caller).
    """
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code, _describe(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ProtocolViolation):
        where = f" in stage {exc.stage}" if exc.stage else ""
        outcome = "the sender was dropped" if exc.drops_sender else "the sender stays in"
        text = f"{text} (refused{where}; {outcome})"
    return text


_FROM_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLarge,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.FAILED_PRECONDITION: Refused,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(err: grpc.RpcError) -> SecAggError:
    """The client-side exception for a failed call (the inverse of :func:`status_for`)."""
    code = err.code()
    details = err.details() or code.name
    if code == grpc.StatusCode.ABORTED:
        return RoundAborted("unknown", details)
    cls = _FROM_CODE.get(code, RemoteError)
    exc = cls(f"{code.name}: {details}")
    if isinstance(exc, RemoteError):
        exc.code = code
    return exc


EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_ABORTED = 3
EXIT_AUDIT = 4
EXIT_LOCKED = 5
EXIT_NOT_FOUND = 6
EXIT_DENIED = 7
EXIT_UNAVAILABLE = 8

EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    # (class, exit status, meaning); the first matching class wins, subclasses first.
    # Exit 3 (a round that ended aborted) and 4 (the audit chain does not verify) are
    # outcomes, not exceptions: the commands return them.
    (StoreLocked, EXIT_LOCKED, "another server holds the store (the message names it)"),
    (TlsError, EXIT_UNAVAILABLE, "TLS failure: certificate, key, CA or server name"),
    (Unavailable, EXIT_UNAVAILABLE, "the server cannot be reached"),
    (JobAborted, EXIT_ABORTED, "the job was aborted (the message gives the reason)"),
    (NotFound, EXIT_NOT_FOUND, "no such round, job or participant (or audit entries for it)"),
    (Unauthenticated, EXIT_DENIED, "bad or missing admin token or credentials"),
    (PermissionDenied, EXIT_DENIED, "the caller may not do this"),
    (ConfigurationError, EXIT_CONFIG, "bad flag, config file, key file or parameters"),
    (InputError, EXIT_CONFIG, "bad input value"),
    (OSError, EXIT_CONFIG, "a file cannot be read or written"),
    (SecAggError, EXIT_ERROR, "any other refusal (the server's reason is printed)"),
)
"""The exit statuses of ``secagg`` (0 is success; argparse usage errors are 2 as well)."""


def exit_code_for(exc: BaseException) -> int:
    """The ``secagg`` exit status for ``exc`` (the first row of :data:`EXIT_CODES` it is)."""
    for cls, code, _meaning in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR
