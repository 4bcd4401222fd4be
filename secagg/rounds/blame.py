"""Rounds 5 and 6 of a ``hybrid`` round: the key holders' verdict on the encrypted result,
and tracing a sum that does not decrypt to its sender (:mod:`secagg.he_blame`).

The server cannot see whether the encrypted sum it published decrypts; only the key holders
can. So a hybrid round completes only once they say so:

* :class:`ResultCheckState` collects one :class:`~secagg.messages.ResultVerdict` from each
  survivor. If none rejects the sum, the round completes with it.
* Otherwise the server runs :func:`~secagg.he_blame.keyless_check` on every kept signed
  upload (no key needed); an upload that fails names its sender at once. If all pass, the
  uploads are dealt to the key holders that rejected the sum, each upload to
  :data:`~secagg.he_blame.CHECK_COPIES` of them (never its sender, at most
  :data:`~secagg.policy.MAX_BLAME_CHECKS` per holder), in a
  :class:`~secagg.messages.BlameRequest`.
* :class:`BlameCheckState` collects the signed :class:`~secagg.messages.BlameVerdict`\\ s and
  aborts the round naming the culprits (:func:`~secagg.he_blame.decide`): a sender blamed by
  two holders and cleared by none is dropped with the reason; a dispute names both sides and
  nobody is dropped. The verdicts stay in ``ctx.blame_verdicts`` as signed evidence.
"""

from __future__ import annotations

from secagg import he_blame
from secagg.errors import ProtocolViolation, RoundAborted
from secagg.keys import verify_signature
from secagg.messages import BlameRequest, BlameVerdict, Message, ResultVerdict
from secagg.params import Mode
from secagg.policy import MAX_BLAME_CHECKS
from secagg.rounds.base import Outgoing, ServerContext, ServerState, Stage
from secagg.rounds.terminal import CompletedState

__all__ = ["BlameCheckState", "ResultCheckState", "after_result"]


def after_result(ctx: ServerContext) -> ServerState:
    """The state after the result is published: completed, or (hybrid) the result check.

    In a hybrid round the result is held in ``ctx.pending`` (``ctx.result`` stays ``None``)
    until the key holders accept it.
    """
    if ctx.params.mode is not Mode.HYBRID or ctx.result is None:
        return CompletedState(ctx)
    ctx.pending, ctx.result = ctx.result, None
    return ResultCheckState(ctx, ctx.active(ctx.u2))


class ResultCheckState(ServerState):
    """hybrid: wait for each survivor's verdict on the encrypted result."""

    stage = Stage.RESULT_CHECK
    accepts = ResultVerdict

    def __init__(self, ctx: ServerContext, expected: frozenset[int]) -> None:
        super().__init__(ctx, expected)
        self.rejected: set[int] = set()

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ResultVerdict)
        self.check_session(cid, msg.session_id)

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, ResultVerdict)
        if not msg.ok:
            self.rejected.add(cid)

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        ctx = self.ctx
        if not self.rejected:
            # Silent clients cannot hold the result back: they were sent it.
            ctx.result = ctx.pending
            return CompletedState(ctx), []
        contributors = ctx.pending.contributors if ctx.pending is not None else ctx.u2
        uploads = {cid: ctx.uploads[cid] for cid in contributors if cid in ctx.uploads}
        assert ctx.he is not None
        failed = {
            cid: why
            for cid, up in uploads.items()
            if (why := he_blame.keyless_check(ctx.he, up)) is not None
        }
        rejecters = sorted(ctx.active(self.rejected))
        if failed:
            for cid, why in failed.items():
                ctx.drop(cid, self.stage, f"upload fails the keyless check: {why}")
            raise RoundAborted(
                self.stage,
                f"key holders {rejecters} rejected the sum; clients {sorted(failed)} uploaded "
                "ciphertexts that fail the server's keyless check",
            )
        if len(rejecters) < 2:
            raise RoundAborted(
                self.stage,
                f"key holders {rejecters} rejected the sum; fewer than two can check uploads, "
                "so no sender is named",
            )
        assignment = he_blame.assign_checks(
            uploads, rejecters, copies=he_blame.CHECK_COPIES, limit=MAX_BLAME_CHECKS
        )
        work = {h: senders for h, senders in assignment.items() if senders}
        out: list[Outgoing] = []
        for h, senders in sorted(work.items()):
            req = BlameRequest(
                ctx.params.round_id, 0, ctx.session_id, tuple(uploads[s] for s in senders)
            )
            out.append((h, req))
        return BlameCheckState(ctx, frozenset(work), work), out


class BlameCheckState(ServerState):
    """hybrid: collect the key holders' signed verdicts; abort naming the culprits."""

    stage = Stage.BLAME
    accepts = BlameVerdict

    def __init__(
        self, ctx: ServerContext, expected: frozenset[int], assignment: dict[int, list[int]]
    ) -> None:
        super().__init__(ctx, expected)
        self.assignment = assignment

    def validate(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, BlameVerdict)
        self.check_session(cid, msg.session_id)
        if list(msg.checked) != self.assignment[cid]:
            raise ProtocolViolation(
                f"verdict covers clients {list(msg.checked)}, the request named "
                f"{self.assignment[cid]}",
                client_id=cid,
            )
        blamed = [b for b, _ in msg.blamed]
        if len(set(blamed)) != len(blamed) or not set(blamed) <= set(msg.checked):
            raise ProtocolViolation("verdict blames clients it did not check", client_id=cid)
        verify_signature(
            self.ctx.directory[cid], msg.signed_payload(), msg.signature, client_id=cid
        )

    def store(self, cid: int, msg: Message) -> None:
        assert isinstance(msg, BlameVerdict)
        self.ctx.blame_verdicts[cid] = msg

    def finish(self, now: float) -> tuple[ServerState, list[Outgoing]]:
        ctx = self.ctx
        reports = {
            h: he_blame.BlameReport(v.checked, dict(v.blamed))
            for h, v in ctx.blame_verdicts.items()
        }
        decision = he_blame.decide(self.assignment, reports)
        for cid, why in decision.culprits.items():
            ctx.drop(
                cid,
                self.stage,
                f"upload does not decrypt to in-range lanes ({why}); confirmed by key holders "
                f"{[h for h, r in sorted(reports.items()) if cid in r.blamed]}",
            )
        raise RoundAborted(self.stage, f"the sum does not decrypt: {decision.summary()}")
