"""The server side of one round, sans-I/O.

Feed it client messages with :meth:`SecAggServer.receive` and the current time, call
:meth:`SecAggServer.tick` whenever a timer fires (and after a refused message); both
return ``(client_id, message)`` pairs to send. Nothing here reads a clock, opens a socket
or starts a thread: the service moves bytes and runs timers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

from secagg import ckks
from secagg.errors import (
    ConfigurationError,
    InvalidSignature,
    ProtocolViolation,
    RoundAborted,
    UnknownClient,
)
from secagg.keys import check_identity_key
from secagg.messages import Abort, Message, decode_message
from secagg.params import Mode, RoundParams
from secagg.rounds.advertise_keys import AdvertiseKeysState
from secagg.rounds.base import (
    ClientRecord,
    Outgoing,
    RoundResult,
    ServerContext,
    ServerState,
    Stage,
)
from secagg.rounds.terminal import AbortedState

__all__ = ["PER_CLIENT_SECONDS", "PER_VALUE_SECONDS", "SecAggServer", "StageTimeouts"]


PER_CLIENT_SECONDS = 0.05
"""Seconds a default stage deadline grows per invited client (:meth:`StageTimeouts.for_round`):
the server handles each client's message in turn, and a client's own checks hash the roster."""
PER_VALUE_SECONDS = 5e-7
"""Seconds a default bulk-stage deadline (masked input, unmasking, encrypted input) grows per
client x value: what moving and adding ``n * dim`` words costs, with room for a slow link."""
_BULK = frozenset({"masked_input", "unmasking", "encrypted_input"})


_SAME_DEADLINE = {Stage.RESULT_CHECK: "unmasking", Stage.BLAME: "unmasking"}


@dataclass(frozen=True)
class StageTimeouts:
    """Seconds each stage waits for its slowest client before declaring the rest dropped.

    The defaults are for a small round; :meth:`for_round` grows every stage left at its
    default with the round's size, so a large round does not abort on defaults.
    """

    advertise_keys: float = 30.0
    share_keys: float = 30.0
    masked_input: float = 120.0
    consistency: float = 30.0
    unmasking: float = 60.0
    encrypted_input: float = 120.0
    reveal_nonces: float = 30.0

    @classmethod
    def uniform(cls, seconds: float) -> StageTimeouts:
        return cls(*(seconds for _ in fields(cls)))

    def for_round(self, n_clients: int, dim: int) -> StageTimeouts:
        """These deadlines for a round of ``n_clients`` x ``dim``: each stage still at its
        default gets ``PER_CLIENT_SECONDS * n`` more (bulk stages also
        ``PER_VALUE_SECONDS * n * dim``); a stage set explicitly is kept as given."""
        default = StageTimeouts()
        values: dict[str, float] = {}
        for f in fields(self):
            value = float(getattr(self, f.name))
            if value == getattr(default, f.name):
                value += PER_CLIENT_SECONDS * n_clients
                if f.name in _BULK:
                    value += PER_VALUE_SECONDS * n_clients * dim
            values[f.name] = value
        return StageTimeouts(**values)

    def for_stage(self, stage: Stage) -> float:
        # hybrid's result check and blame stages wait as long as unmasking does
        name = _SAME_DEADLINE.get(stage, stage.value)
        value = getattr(self, name, None)
        return float(value) if value is not None else float("inf")


class SecAggServer:
    """Drives one round through its states.

    Parameters
    ----------
    params:
        The round's public parameters; ``params.n_clients`` must equal ``len(directory)``.
    directory:
        Client id -> Ed25519 identity public key of every client invited to the round.
    timeouts:
        Stage deadlines.
    now:
        The current time (any monotonic clock, in seconds).
    he_context:
        ``hybrid`` mode: the server's CKKS context (no key of any kind).
    """

    def __init__(
        self,
        params: RoundParams,
        directory: Mapping[int, bytes],
        *,
        timeouts: StageTimeouts | None = None,
        now: float = 0.0,
        he_context: ckks.ServerContext | None = None,
    ) -> None:
        if params.mode not in self.modes:
            raise ConfigurationError(
                f"{type(self).__name__} does not run {params.mode.name} rounds"
            )
        if params.mode is not Mode.MASKED and he_context is None:
            raise ConfigurationError("ckks and hybrid rounds need the server's CKKS context")
        if len(directory) != params.n_clients:
            raise ConfigurationError(
                f"params are for {params.n_clients} clients, directory has {len(directory)}"
            )
        for cid, pk in directory.items():
            if not 1 <= cid < 1 << 32:
                raise ConfigurationError(f"client ids must be in 1..2^32-1, got {cid}")
            try:
                check_identity_key(pk)
            except InvalidSignature as exc:
                raise ConfigurationError(f"identity key of client {cid}: {exc}") from None
        self.timeouts = timeouts or StageTimeouts().for_round(params.n_clients, params.dim)
        self.ctx = ServerContext(params, dict(directory), he=he_context)
        first = self._first_state()
        first.deadline = now + self.timeouts.for_stage(first.stage)
        self._state: ServerState = first
        self._stage_started: dict[Stage, float] = {first.stage: now}
        self._stage_ended: dict[Stage, float] = {}

    modes: tuple[Mode, ...] = (Mode.MASKED, Mode.HYBRID)
    """The modes this driver runs."""

    def _first_state(self) -> ServerState:
        return AdvertiseKeysState(self.ctx, frozenset(self.ctx.directory))

    # -- observation ------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._state.stage

    @property
    def done(self) -> bool:
        return self.stage in (Stage.COMPLETED, Stage.ABORTED)

    @property
    def result(self) -> RoundResult | None:
        return self.ctx.result

    @property
    def error(self) -> RoundAborted | None:
        return self.ctx.error

    @property
    def deadline(self) -> float | None:
        """When :meth:`tick` must next be called, or ``None`` once the round is over."""
        return None if self.done else self._state.deadline

    @property
    def records(self) -> Mapping[int, ClientRecord]:
        return self.ctx.records

    @property
    def session_id(self) -> bytes:
        return self.ctx.session_id

    @property
    def stage_times(self) -> dict[str, float]:
        """Seconds (on the caller's clock) each finished stage took."""
        return {
            s.value: self._stage_ended[s] - self._stage_started[s]
            for s in self._stage_ended
            if s in self._stage_started
        }

    # -- input -------------------------------------------------------------------------------

    def receive(
        self,
        client_id: int,
        message: Message | bytes,
        now: float,
        *,
        digest: bytes | None = None,
    ) -> list[Outgoing]:
        """Accept one message from ``client_id`` (authenticated by the transport).

        A caller that decoded ``message`` itself may pass ``digest``, the SHA-256 of the
        bytes it came from, to spare re-encoding it (duplicate detection hashes messages).

        Raises
        ------
        ProtocolViolation
            When the message is refused. The sender has then been dropped if
            ``exc.drops_sender``; call :meth:`tick` afterwards, since a drop can let the
            stage finish.
        """
        stage = self.stage
        try:
            if isinstance(message, bytes | bytearray):
                msg = decode_message(message)
                digest = hashlib.sha256(message).digest()
            else:
                msg = message
            self._state.handle(client_id, msg, digest)
        except ProtocolViolation as exc:
            exc.client_id = client_id
            exc.stage = stage.value
            if exc.drops_sender and not isinstance(exc, UnknownClient):
                self.ctx.drop(client_id, stage, f"{type(exc).__name__}: {exc}")
            raise
        return self.tick(now)

    def tick(self, now: float) -> list[Outgoing]:
        """Advance past every stage that is complete or whose deadline has passed."""
        out: list[Outgoing] = []
        while not self.done and (self._state.ready() or now >= self._state.deadline):
            stage = self._state.stage
            try:
                nxt, msgs = self._state.finish(now)
            except RoundAborted as exc:
                self._stage_ended[stage] = now
                return out + self._abort(exc)
            self._stage_ended[stage] = now
            nxt.deadline = now + self.timeouts.for_stage(nxt.stage)
            self._stage_started[nxt.stage] = now
            self._state = nxt
            out.extend(msgs)
            if self.ctx.gone:
                self._drop_gone()  # known gone: the new stage does not wait for them
        return out

    def depart(self, client_id: int, now: float, reason: str) -> list[Outgoing]:
        """The transport says ``client_id`` is gone (its stream closed and it did not
        reconnect within the grace period): it is dropped now if it still owes the current
        stage a message, else as soon as a later stage expects one from it. The stage ends
        as soon as every expected client has answered or is known gone, not at its
        deadline. :meth:`rejoin` undoes it while the client is not yet dropped."""
        if self.done or client_id not in self.ctx.records:
            return []
        self.ctx.gone.add(client_id)
        self._drop_gone(reason)
        return self.tick(now)

    def rejoin(self, client_id: int) -> None:
        """``client_id`` reconnected: no longer treat it as gone."""
        self.ctx.gone.discard(client_id)

    def _drop_gone(self, reason: str = "its stream closed and it did not reconnect") -> None:
        state = self._state
        for cid in sorted(self.ctx.gone & state.expected):
            if cid not in state.received:
                self.ctx.drop(cid, state.stage, f"{reason} (stage {state.stage})")

    def abort(self, stage: str, reason: str) -> list[Outgoing]:
        """Abort the round from outside (operator request, shutdown)."""
        if self.done:
            return []
        return self._abort(RoundAborted(stage, reason))

    def _abort(self, exc: RoundAborted) -> list[Outgoing]:
        self.ctx.error = exc
        notified = sorted(c for c, r in self.ctx.records.items() if r.active)
        self._state = AbortedState(self.ctx)
        msg = Abort(self.ctx.params.round_id, 0, exc.stage, exc.reason)
        return [(cid, msg) for cid in notified]
