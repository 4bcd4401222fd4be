"""Round 2, MaskedInputCollection: sum masked vectors as they arrive (as fcp/secagg does)."""

from __future__ import annotations

import numpy as np

from secagg import ckks
from secagg.errors import ProtocolViolation
from secagg.keys import verify_signature
from secagg.messages import (
    ConsistencyRequest,
    EncryptedInput,
    MaskedInput,
    Message,
    encrypted_input_payload,
)
from secagg.params import Mode
from secagg.rounds.base import Outgoing, ServerContext, ServerState, Stage

__all__ = ["MaskedInputState"]


class MaskedInputState(ServerState):
    """Adds each masked input into the running sum mod 2^64; never keeps one on its own.

    In ``hybrid`` mode the masked input is CKKS ciphertexts of masked slot values, added
    homomorphically: the server sees neither an input nor, later, the sum.
    """

    stage = Stage.MASKED_INPUT
    accepts: type[Message] | None = MaskedInput

    def __init__(self, ctx: ServerContext, expected: frozenset[int]) -> None:
        super().__init__(ctx, expected)
        if ctx.params.mode is Mode.HYBRID:
            assert ctx.he is not None
            self.accepts = EncryptedInput
            ctx.he_sum = ckks.CiphertextSum(ctx.he)
        else:
            ctx.acc = np.zeros(ctx.params.words, dtype=np.uint64)

    def handle(self, cid: int, msg: Message, digest: bytes | None = None) -> None:
        try:
            super().handle(cid, msg, digest)
        except ProtocolViolation as exc:
            # An input already summed cannot be taken out again: its sender stays in.
            if cid in self.received:
                exc.drops_sender = False
            raise

    def validate(self, cid: int, msg: Message) -> None:
        if isinstance(msg, EncryptedInput):
            # Verify, then add atomically: CiphertextSum checks every ciphertext first.
            self.check_session(cid, msg.session_id)
            payload = encrypted_input_payload(msg.session_id, cid, msg.ciphertexts)
            verify_signature(self.ctx.directory[cid], payload, msg.signature, client_id=cid)
            assert self.ctx.he_sum is not None
            self.ctx.he_sum.add(msg.ciphertexts, client_id=cid)
            return
        assert isinstance(msg, MaskedInput)
        self.check_session(cid, msg.session_id)
        if msg.words.size != self.ctx.params.words:
            raise ProtocolViolation(
                f"masked input has {msg.words.size} words, the round expects "
                f"{self.ctx.params.words}",
                client_id=cid,
            )

    def store(self, cid: int, msg: Message) -> None:
        if isinstance(msg, MaskedInput):
            self.ctx.acc += msg.words
        elif isinstance(msg, EncryptedInput):
            self.ctx.uploads[cid] = msg  # signed evidence, should the sum not decrypt

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        from secagg.rounds.consistency import ConsistencyState

        ctx = self.ctx
        # Clients dropped for a violation after sending are still in the sum.
        for cid in self.expected - self.received:
            ctx.drop(cid, self.stage, f"no {self.stage} message before the deadline")
        u2 = tuple(sorted(self.received))
        self.require(u2, "sent a masked input")
        ctx.u2 = u2
        request = ConsistencyRequest(ctx.params.round_id, 0, ctx.session_id, u2)
        out: list[Outgoing] = [(cid, request) for cid in sorted(ctx.active(u2))]
        return ConsistencyState(ctx, ctx.active(u2)), out
