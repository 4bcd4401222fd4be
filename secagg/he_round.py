"""The ``ckks`` round (sans-I/O).

A ``ckks`` round needs no key agreement and no unmasking: every client encrypts its packed
update under the key holders' CKKS key, the server (holding a context with no key at all)
adds the ciphertexts as they arrive and publishes the encrypted sum. The trust model is
NVIDIA FLARE's: the server must not collude with any key holder (``docs/threat-model.md``).

What a ``ckks`` client cannot check: that the "sum" it is handed is a sum. The server can
present one client's upload (or any subset's) as the aggregate and every key holder decrypts
it: in this mode the server is trusted not to do that. Nor can a failed sum be traced to
its sender, since decrypting an upload alone would reveal a plain update (hybrid rounds
can, :mod:`secagg.he_blame`).

The session id binds the key epoch (:attr:`~secagg.ckks_budget.KeyEpoch.fingerprint` of the
contexts), and every decryption is charged to the key holder's budget first; a client whose
budget is spent refuses the round before it uploads.

Because there is no unmasking, the round can also be asynchronous, FedBuff-style
(Nguyen et al., AISTATS 2022): with ``publish_after=K`` the server publishes the sum as soon
as ``K`` clients have submitted, or at the deadline if at least ``t`` have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy.typing as npt

from secagg import ckks
from secagg.client import SecAggClient, _State, decrypt_result, encrypted_input
from secagg.errors import ConfigurationError, KeyEpochMismatch, UnexpectedMessage
from secagg.keys import IdentityKey, verify_signature
from secagg.messages import (
    EncryptedInput,
    EncryptedResult,
    Message,
    encrypted_input_payload,
)
from secagg.params import Mode, RoundParams
from secagg.policy import ClientPolicy, check_contributors
from secagg.rounds.base import (
    Outgoing,
    RoundResult,
    ServerContext,
    ServerState,
    Stage,
)
from secagg.rounds.terminal import CompletedState
from secagg.server import SecAggServer, StageTimeouts

__all__ = ["CkksClient", "CkksServer", "ckks_session_id"]


def ckks_session_id(params: RoundParams, key_epoch: bytes = b"") -> bytes:
    """A ``ckks`` round has no advertised keys: its session id binds the parameters and the
    key epoch's fingerprint (``key_epoch``, 16 bytes; empty for none), so a client of another
    epoch fails the session check before anything is decrypted."""
    data = b"secagg/v1/ckks-session" + params.digest()
    if key_epoch:
        data += b"epoch" + key_epoch
    return hashlib.sha256(data).digest()


class CollectState(ServerState):
    """The only stage of a ``ckks`` round: verify and add signed ciphertexts."""

    stage = Stage.ENCRYPTED_INPUT
    accepts = EncryptedInput

    def __init__(self, ctx: ServerContext, expected: frozenset[int], publish_after: int) -> None:
        super().__init__(ctx, expected)
        assert ctx.he is not None
        ctx.he_sum = ckks.CiphertextSum(ctx.he)
        self.publish_after = publish_after

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, EncryptedInput) and self.ctx.he_sum is not None
        self.check_session(cid, msg.session_id)
        payload = encrypted_input_payload(msg.session_id, cid, msg.ciphertexts)
        verify_signature(self.ctx.directory[cid], payload, msg.signature, client_id=cid)
        self.ctx.he_sum.add(msg.ciphertexts, client_id=cid)

    def ready(self) -> bool:
        return len(self.received) >= self.publish_after or super().ready()

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        ctx = self.ctx
        assert ctx.he_sum is not None
        contributors = tuple(sorted(self.received))
        for cid in self.expected - self.received:
            ctx.drop(cid, self.stage, "no encrypted input before the round was published")
        self.require(contributors, "submitted an encrypted input")
        cts = tuple(ctx.he_sum.finish())
        ctx.result = RoundResult(contributors, ciphertexts=cts)
        # a sharded group round (he_clients): the sum is the coordinator's, not the members'
        shown = () if ctx.params.he_clients else cts
        msg = EncryptedResult(ctx.params.round_id, 0, ctx.session_id, contributors, shown)
        return CompletedState(ctx), [(cid, msg) for cid in contributors]


class CkksServer(SecAggServer):
    """Server of one ``ckks`` round; the same driving interface as :class:`SecAggServer`.

    Parameters
    ----------
    params, directory:
        As for :class:`~secagg.server.SecAggServer` (``params.mode`` is ``ckks``).
    he_context:
        The server's CKKS context, which holds no key (checked when it was loaded).
    timeout:
        Seconds to wait for uploads.
    publish_after:
        Publish once this many clients uploaded (FedBuff-style asynchronous aggregation);
        default: all of them. Never below ``params.threshold``.
    """

    modes = (Mode.CKKS,)

    def __init__(
        self,
        params: RoundParams,
        directory: Mapping[int, bytes],
        he_context: ckks.ServerContext,
        *,
        timeout: float = 120.0,
        now: float = 0.0,
        publish_after: int | None = None,
    ) -> None:
        k = params.n_clients if publish_after is None else publish_after
        if not params.threshold <= k <= params.n_clients:
            raise ConfigurationError(
                f"publish_after must be in t={params.threshold}..n={params.n_clients}, got {k}"
            )
        self.publish_after = k
        timeouts = StageTimeouts(encrypted_input=timeout)
        super().__init__(params, directory, timeouts=timeouts, now=now, he_context=he_context)

    def _first_state(self) -> ServerState:
        assert self.ctx.he is not None
        self.ctx.session_id = ckks_session_id(self.ctx.params, self.ctx.he.epoch.fingerprint)
        return CollectState(self.ctx, frozenset(self.ctx.directory), self.publish_after)


class _CkksWaiting(_State):
    stage = Stage.ENCRYPTED_INPUT
    accepts = EncryptedResult

    def handle(self, msg: Message) -> tuple[_State, list[Message]]:
        from secagg.client import finish_result, group_notice

        assert isinstance(msg, EncryptedResult)
        c = self.ctx
        if msg.session_id != c.session_id:
            raise c.misbehaviour("result bound to another session")
        if c.cid not in msg.contributors:
            raise c.misbehaviour("result's contributor set omits this client")
        if not set(msg.contributors) <= set(c.directory):
            raise c.misbehaviour("result's contributor set names clients outside the directory")
        check_contributors(msg.contributors, c.params, c.policy)  # before decrypting
        if c.group_round:  # sharded: the group's sum is the coordinator's, never decrypted
            return group_notice(c, msg), []
        return finish_result(c, decrypt_result(c, msg.ciphertexts), msg.contributors), []


class CkksClient(SecAggClient):
    """One key holder's participation in a ``ckks`` round: encrypt, upload, decrypt.

    ``key_epoch``: the round's key-epoch fingerprint as announced to this client (e.g. with
    the round's description); a context of another epoch is refused here with
    :class:`~secagg.errors.KeyEpochMismatch`. Either way the session id binds the client's
    own epoch. :meth:`start` refuses (:class:`~secagg.errors.DecryptionBudgetExhausted`)
    when the context has no decryption left, before anything is sent. ``group_round``: a
    group round of a sharded round (:class:`~secagg.client.SecAggClient`); the client then
    refuses the group's encrypted sum and ends with the contributors.
    """

    modes = (Mode.CKKS,)

    def __init__(
        self,
        client_id: int,
        identity: IdentityKey,
        params: RoundParams,
        directory: Mapping[int, bytes],
        x: npt.ArrayLike,
        weight: int,
        he_context: ckks.SecretContext,
        *,
        rounding_key: bytes | None = None,
        policy: ClientPolicy | None = None,
        layout: bytes | None = None,
        key_epoch: bytes | None = None,
        group_round: bool = False,
    ) -> None:
        if key_epoch is not None and key_epoch != he_context.epoch.fingerprint:
            raise KeyEpochMismatch(
                f"the round is bound to CKKS key {key_epoch.hex()}, this context is key "
                f"{he_context.epoch.fingerprint.hex()} (epoch {he_context.epoch.epoch})"
            )
        super().__init__(
            client_id,
            identity,
            params,
            directory,
            x,
            weight,
            rounding_key=rounding_key,
            he_context=he_context,
            policy=policy,
            layout=layout,
            group_round=group_round,
        )

    def _first_state(self) -> _State:
        he = self._ctx.he
        assert he is not None
        self._ctx.session_id = ckks_session_id(self._ctx.params, he.epoch.fingerprint)
        return _CkksWaiting(self._ctx)

    def start(self, now: float = 0.0) -> list[Message]:
        """The only message: the signed encrypted upload."""
        c = self._ctx
        if self._started:
            raise UnexpectedMessage("client already started", client_id=c.cid)
        assert c.he is not None
        c.he.require_budget(1)  # the result will need one decryption: refuse before sending
        self._started = True
        msg = encrypted_input(c, c.session_id, [])
        c.x = None  # the plaintext update is no longer needed
        return [msg]
