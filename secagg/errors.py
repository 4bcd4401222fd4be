"""One error hierarchy for the whole package.

Every failure the protocol can detect raises a subclass of :class:`SecAggError`. Errors that
are caused by one participant's message carry that participant's id so the server can drop
the offender and carry on with the honest clients; errors that end a round carry the stage.

Nothing here ever includes secret material in its message.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "CryptoError",
    "DecryptionBudgetExhausted",
    "DecryptionError",
    "DuplicateMessage",
    "GroupResultRefused",
    "InfeasibleParameters",
    "InputError",
    "InvalidPublicKey",
    "InvalidSignature",
    "KernelError",
    "KeyEpochMismatch",
    "LateMessage",
    "LayoutMismatch",
    "MalformedMessage",
    "PolicyViolation",
    "PrivacyBudgetExceeded",
    "ProtocolViolation",
    "ReconstructionError",
    "RoundAborted",
    "SecAggError",
    "ServerMisbehaviour",
    "StoreError",
    "UnexpectedMessage",
    "UnknownClient",
    "WrongSession",
]


class SecAggError(Exception):
    """Base of every error raised by secagg."""


# --- configuration -----------------------------------------------------------------------


class ConfigurationError(SecAggError):
    """A parameter or option is invalid on its own (wrong type, out of range)."""


class InfeasibleParameters(ConfigurationError):
    """No parameter set meets the requested security, correctness or size goals."""


class PrivacyBudgetExceeded(ConfigurationError):
    """A round would spend more differential-privacy budget than its job has left."""


class InputError(SecAggError):
    """A local input (the vector to aggregate, a weight) cannot be encoded."""


class LayoutMismatch(InputError):
    """The local update's layout (names, shapes, dtypes, order) differs from the round's
    fingerprint: summing it would silently add unrelated parameters. Nothing is sent."""


# --- messages from one participant -------------------------------------------------------


class ProtocolViolation(SecAggError):
    """A message from one participant breaks the protocol.

    Parameters
    ----------
    message:
        Human-readable reason, never containing secrets.
    client_id:
        The participant the message came from (``None`` when it came from the server or
        the sender is unknown).
    stage:
        The protocol stage in which the message arrived, when known.
    """

    drops_sender: bool = True
    """Whether the server drops the sender from the round for this violation."""

    def __init__(
        self, message: str, *, client_id: int | None = None, stage: str | None = None
    ) -> None:
        super().__init__(message)
        self.client_id = client_id
        self.stage = stage


class MalformedMessage(ProtocolViolation):
    """Bytes that do not decode to a well-formed message (length, range, type checks)."""


class UnknownClient(ProtocolViolation):
    """A message from, or naming, a client that is not part of the round."""

    drops_sender = False


class WrongSession(ProtocolViolation):
    """A message bound to another round or session (cross-round replay)."""

    drops_sender = False


class DuplicateMessage(ProtocolViolation):
    """An exact repeat of a message already accepted (a replay or a retry); it is ignored.

    A *different* second message of the same kind is equivocation and raises the base
    :class:`ProtocolViolation`, which drops the sender.
    """

    drops_sender = False


class UnexpectedMessage(ProtocolViolation):
    """A message that is not accepted in the current state."""


class LateMessage(UnexpectedMessage):
    """A message from a client already declared dropped; it is discarded unread."""

    drops_sender = False


class InvalidSignature(ProtocolViolation):
    """A signature that does not verify under the sender's identity key."""


class ServerMisbehaviour(ProtocolViolation):
    """The server sent something an honest server never sends; the client aborts."""


class PolicyViolation(ServerMisbehaviour, ConfigurationError):
    """The round the server proposes, or a set it hands back, breaks the client's own
    :class:`secagg.policy.ClientPolicy`: weak ``(n, k, t)``, too few contributors, a mode,
    size or layout the client does not accept. The client refuses before revealing anything;
    the message names the numbers that missed."""


class GroupResultRefused(PolicyViolation):
    """Sharded ``hybrid``/``ckks``: the server handed a group member its group's encrypted
    sum. A group's sum goes to the coordinator only; the member decrypts the total alone
    (docs/sharding.md), so it refuses before decrypting anything."""


# --- cryptography -------------------------------------------------------------------------


class CryptoError(SecAggError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError, ProtocolViolation):
    """An authenticated ciphertext failed to decrypt (wrong key, tampered, truncated)."""


class DecryptionBudgetExhausted(CryptoError):
    """A key holder's CKKS context has spent its decryption budget for its key epoch.

    Every accept/abort of a CKKS decryption leaks up to one bit about the secret key's noise
    (``docs/ckks.md``, "Decryption budget"); past the budget the key must be rotated
    (``secagg keygen --ckks --epoch E+1``).
    """


class KeyEpochMismatch(ConfigurationError):
    """A round, ciphertext sum or budget ledger belongs to another CKKS key epoch."""


class InvalidPublicKey(CryptoError, ProtocolViolation):
    """An X25519 public key that is malformed, non-canonical or of small order (RFC 7748
    section 6.1): refused when advertised, so its sender is dropped and named."""


class ReconstructionError(CryptoError):
    """Shamir reconstruction failed: too few shares, or shares inconsistent with a commitment."""


# --- round outcome -----------------------------------------------------------------------


class RoundAborted(SecAggError):
    """The round ended without a result.

    Parameters
    ----------
    stage:
        Name of the stage that could not complete (for example ``"share_keys"``).
    reason:
        Why, including the counts and the threshold where that is the cause.
    """

    def __init__(
        self,
        stage: str,
        reason: str,
        *,
        blamed: int | None = None,
        evidence: dict[str, object] | None = None,
    ) -> None:
        super().__init__(f"round aborted in stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason
        self.blamed = blamed
        """The client whose own signed messages prove it caused the abort, if any."""
        self.evidence = evidence
        """JSON-ready proof against ``blamed`` (for the audit log), if any."""


# --- other layers ---------------------------------------------------------------------------


class KernelError(SecAggError):
    """A bulk-math kernel was called with unsupported arguments or device."""


class StoreError(SecAggError):
    """The embedded store is unreadable, or its audit chain does not verify."""
