"""Shared server-side round context and the base class of every server state.

Following Google's fcp/secagg server, each protocol round is one state object. A state
accepts one message type, validates and stores it in the shared :class:`ServerContext`,
and, once every expected client has answered or the stage deadline passed, computes the
next state and the messages to send (:meth:`ServerState.finish`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from secagg import ckks
from secagg.errors import (
    ConfigurationError,
    DuplicateMessage,
    LateMessage,
    ProtocolViolation,
    RoundAborted,
    UnexpectedMessage,
    UnknownClient,
    WrongSession,
)
from secagg.messages import AdvertiseKeys, BlameVerdict, EncryptedInput, Message
from secagg.params import RoundParams

__all__ = [
    "ClientRecord",
    "Outgoing",
    "RoundResult",
    "ServerContext",
    "ServerState",
    "Stage",
]

Outgoing = tuple[int, Message]
"""A message and the id of the client it goes to."""


class Stage(StrEnum):
    """Names of the protocol stages, used in errors, logs and the audit trail."""

    ADVERTISE_KEYS = "advertise_keys"
    REVEAL_NONCES = "reveal_nonces"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASKING = "unmasking"
    ENCRYPTED_INPUT = "encrypted_input"
    RESULT_CHECK = "result_check"
    BLAME = "blame"
    COMPLETED = "completed"
    ABORTED = "aborted"


@dataclass
class ClientRecord:
    """What the server knows of one client's participation."""

    active: bool = True
    dropped_stage: Stage | None = None
    reason: str | None = None


@dataclass(frozen=True, eq=False)
class RoundResult:
    """The outcome of a completed round.

    In ``masked`` mode the server learns the sums; in ``ckks`` and ``hybrid`` modes it holds
    only ``ciphertexts`` of the sum, which key holders decrypt.

    Attributes
    ----------
    contributors:
        Ids whose inputs are in the sum.
    sums:
        Exact lane-wise integer sums (``quant.values(dim)`` of them; the last is the total
        weight in weighted rounds); ``None`` when the server cannot see them.
    total_weight:
        ``sum w_u`` (number of contributors when unweighted); ``None`` likewise.
    weighted_sum:
        Dequantized ``sum_u w_u x_u``; ``None`` likewise.
    ciphertexts:
        The encrypted sum (``ckks`` and ``hybrid``).
    dp:
        DP rounds: the figures of the release (``target_std``, ``released_std``,
        ``honest_std``, ``contributors``, ``removed_components``, ``rho_round``, ...);
        ``sums`` then holds the ``d'`` released ring values mod ``2^b`` and
        ``weighted_sum`` the released (noisy) sum of the clipped updates.
    """

    contributors: tuple[int, ...]
    sums: npt.NDArray[np.uint64] | None = None
    total_weight: int | None = None
    weighted_sum: npt.NDArray[np.float64] | None = None
    ciphertexts: tuple[bytes, ...] | None = None
    dp: dict[str, object] | None = None
    dp_removal: bytes = b""
    """Hybrid DP: the packed removal (:class:`~secagg.messages.EncryptedResult`)."""

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        """The (weighted) average of the contributors' inputs (``masked`` mode)."""
        if self.weighted_sum is None or not self.total_weight:
            raise ConfigurationError("the server holds only an encrypted sum")
        return self.weighted_sum / float(self.total_weight)


@dataclass
class ServerContext:
    """Everything the server states share; rounds append to it as they complete."""

    params: RoundParams
    directory: Mapping[int, bytes]
    he: ckks.ServerContext | None = None
    params_digest: bytes = b""
    records: dict[int, ClientRecord] = field(default_factory=dict)
    accepted: dict[tuple[int, int], bytes] = field(default_factory=dict)
    advertised: dict[int, AdvertiseKeys] = field(default_factory=dict)
    session_id: bytes = b""
    nonces: dict[int, bytes] = field(default_factory=dict)
    graph: dict[int, frozenset[int]] = field(default_factory=dict)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)
    share_commits: dict[int, dict[int, bytes]] = field(default_factory=dict)
    """dealer -> holder -> the dealer's signed ``H_seed || H_key || sig`` (kept to unmasking)."""
    u1: frozenset[int] = frozenset()
    acc: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    he_sum: ckks.CiphertextSum | None = None
    u2: tuple[int, ...] = ()
    signatures: dict[int, bytes] = field(default_factory=dict)
    u3: frozenset[int] = frozenset()
    seed_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)
    key_shares: dict[int, dict[int, bytes]] = field(default_factory=dict)
    dp_bundles: dict[int, dict[int, bytes]] = field(default_factory=dict)
    """DP rounds: dealer -> neighbour -> DP noise-seed share ciphertext (until delivered)."""
    dp_commits: dict[int, dict[int, bytes]] = field(default_factory=dict)
    """DP rounds: dealer -> holder -> ``H_dp_0 || ..`` (covered by the dealer's signature)."""
    dp_salts: dict[int, bytes] = field(default_factory=dict)
    """DP rounds: dealer -> precompute salt of its noise drawn before the round (signed)."""
    dp_seed_shares: dict[tuple[int, int], dict[int, bytes]] = field(default_factory=dict)
    """DP rounds: (survivor, component) -> holder -> revealed noise-seed share."""
    uploads: dict[int, EncryptedInput] = field(default_factory=dict)
    """hybrid: every accepted signed upload, kept for the blame step."""
    pending: RoundResult | None = None
    """hybrid: the published encrypted result, until the key holders accept it."""
    blame_verdicts: dict[int, BlameVerdict] = field(default_factory=dict)
    """hybrid: the signed verdicts of the blame step (evidence for an audit)."""
    result: RoundResult | None = None
    error: RoundAborted | None = None
    warnings: list[str] = field(default_factory=list)
    gone: set[int] = field(default_factory=set)
    """Clients whose transport closed and did not come back within the grace period
    (:meth:`secagg.server.SecAggServer.depart`): dropped in the first stage they owe a
    message, as soon as that stage starts."""

    def __post_init__(self) -> None:
        self.params_digest = self.params.digest()
        self.records = {cid: ClientRecord() for cid in self.directory}

    def active(self, ids: frozenset[int] | set[int] | tuple[int, ...]) -> frozenset[int]:
        """The members of ``ids`` not dropped so far."""
        return frozenset(i for i in ids if self.records[i].active)

    def drop(self, cid: int, stage: Stage, reason: str) -> None:
        """Mark ``cid`` as dropped in ``stage`` (first reason wins)."""
        rec = self.records.get(cid)
        if rec is not None and rec.active:
            rec.active = False
            rec.dropped_stage = stage
            rec.reason = reason

    def holders(self, cid: int) -> frozenset[int]:
        """Clients holding ``cid``'s shares: its neighbours and itself."""
        return self.graph[cid] | {cid}


class ServerState:
    """Base of the server's per-round states."""

    stage: ClassVar[Stage]
    accepts: type[Message] | None = None
    """The message type this state takes (an instance may narrow it, e.g. by mode)."""

    def __init__(
        self, ctx: ServerContext, expected: frozenset[int], deadline: float = float("inf")
    ) -> None:
        self.ctx = ctx
        self.expected = expected
        self.deadline = deadline  # the driver sets it from its stage timeouts
        self.received: set[int] = set()

    # -- message intake -------------------------------------------------------------------

    def handle(self, cid: int, msg: Message, digest: bytes | None = None) -> None:
        """Validate and store one message from client ``cid``.

        ``digest`` is the SHA-256 of the bytes ``msg`` was decoded from, when the caller has
        them: the codec is canonical (one encoding per message), so it equals the digest of
        ``msg.encode()`` without encoding a large vector again.

        Raises
        ------
        ProtocolViolation
            (or a subclass) when the message is refused; ``drops_sender`` says whether the
            caller must drop the client.
        """
        ctx = self.ctx
        if cid not in ctx.records:
            raise UnknownClient(f"client {cid} is not enrolled in this round", client_id=cid)
        if msg.sender != cid:
            raise ProtocolViolation(
                f"client {cid} sent a message signed as client {msg.sender}", client_id=cid
            )
        if msg.round_id != ctx.params.round_id:
            raise WrongSession("message belongs to another round", client_id=cid)
        rec = ctx.records[cid]
        if not rec.active:
            raise LateMessage(
                f"client {cid} was dropped in stage {rec.dropped_stage}; message discarded",
                client_id=cid,
            )
        if digest is None:
            digest = hashlib.sha256(msg.encode()).digest()
        key = (cid, msg.TYPE)
        previous = ctx.accepted.get(key)
        if previous is not None:
            if previous == digest:
                raise DuplicateMessage(f"repeat of an accepted {msg.stage_name}", client_id=cid)
            raise ProtocolViolation(
                f"client {cid} sent two different {msg.stage_name} messages", client_id=cid
            )
        if self.accepts is None or not isinstance(msg, self.accepts):
            raise UnexpectedMessage(
                f"{msg.stage_name} is not accepted in stage {self.stage}", client_id=cid
            )
        if cid not in self.expected:
            raise UnexpectedMessage(
                f"client {cid} is not expected to send in stage {self.stage}", client_id=cid
            )
        self.validate(cid, msg)
        ctx.accepted[key] = digest
        self.received.add(cid)
        self.store(cid, msg)

    def check_session(self, cid: int, session_id: bytes) -> None:
        if session_id != self.ctx.session_id:
            raise ProtocolViolation("message bound to another session", client_id=cid)

    def validate(self, cid: int, msg: Message) -> None:
        """Check ``msg`` fully before anything is stored (subclasses)."""

    def store(self, cid: int, msg: Message) -> None:
        """Keep what the next stages need (subclasses)."""

    # -- progress ---------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether every expected client still active has answered.

        Called after every message: only the clients yet to answer are looked up, and the
        first active one ends the search (``O(1)`` lookups in a running stage, not ``O(n)``).
        """
        records = self.ctx.records
        return not any(records[c].active for c in self.expected - self.received)

    def survivors(self) -> frozenset[int]:
        """Close the stage: drop silent clients and return those who answered."""
        ctx = self.ctx
        for cid in self.expected - self.received:
            ctx.drop(cid, self.stage, f"no {self.stage} message before the deadline")
        return ctx.active(self.received)

    def require(self, survivors: frozenset[int] | tuple[int, ...], what: str) -> None:
        """Abort unless at least ``t`` clients survive the stage."""
        t = self.ctx.params.threshold
        if len(survivors) < t:
            raise RoundAborted(
                self.stage,
                f"{len(survivors)} of {len(self.expected)} clients {what}; the threshold is {t}",
            )

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        """Move to the next state; raise :class:`RoundAborted` when the round cannot go on."""
        raise NotImplementedError
