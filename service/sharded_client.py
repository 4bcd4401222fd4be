"""The client's side of a sharded round over gRPC (docs/sharding.md, "Over gRPC").

On the front-door round's ``Session`` stream the client runs the assignment of
:mod:`secagg.groups` (:class:`~secagg.groups.GroupJoinClient`: commit, check the roster,
open, check the transcript), then fetches its group round (``GetRound`` of
:func:`secagg.groups.group_round_id`), checks it against the assignment and its own
policy (:func:`secagg.groups.check_group_invite`, directory keys equal the front door's,
same dim and quantization) *before sending anything into it*, runs it as any round, and
finally checks the front door's :class:`~secagg.groups.GroupResults` against what it knows
(its own group's contributors, every completed group at least ``min_contributors`` strong
and inside its group) before returning the published sum.

``ckks``/``hybrid``: the group round runs as a group round of that mode (``group_round``
of :class:`~secagg.client.SecAggClient`/:class:`~secagg.he_round.CkksClient`): the group's
encrypted sum is the coordinator's, so the client ends the group round with the server's
notice of its contributors and refuses any ciphertext there
(:class:`~secagg.errors.GroupResultRefused`) before decrypting anything. The front door then
sends the encrypted total of the groups with its key epoch; after the checks above the client
refuses a total under another epoch, decrypts it with its own key (one decryption of its
budget per sharded round, required before anything is sent) and, in weighted rounds, refuses
a total whose weight lane cannot come from the published contributors (``count <= weight <=
count * max_weight``; a group's sum passed off as the total of more contributors fails it
unless the coordinator adds ciphertexts several times, which no client can see:
docs/sharding.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from secagg import ckks, kernels
from secagg import groups as gr
from secagg.client import ClientResult, decrypt_lane_sums
from secagg.errors import (
    DecryptionBudgetExhausted,
    PolicyViolation,
    RoundAborted,
    SecAggError,
    ServerMisbehaviour,
)
from secagg.keys import constant_time_equal
from secagg.messages import Message
from secagg.params import Mode
from secagg.service.errors import PolicyRefused
from secagg.service.serde import JoinedRound

if TYPE_CHECKING:
    from secagg.service.client import Client, HEContext

__all__ = ["FrontDoorClient", "participate_sharded"]


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def encode(self) -> bytes:
        return self.data


class FrontDoorClient:
    """The front-door stream's "core" for :class:`secagg.service.client._Session`: the
    assignment messages in and out; the group round runs inside :meth:`receive` once the
    assignment is checked; the published sum last."""

    def __init__(
        self,
        client: Client,
        joined: JoinedRound,
        run_group: Callable[[JoinedRound], ClientResult | None],
        secret: ckks.SecretContext | None = None,
    ) -> None:
        self.client = client
        self.secret = secret
        """``ckks``/``hybrid``: this key holder's context (decrypts the total)."""
        self.joined = joined
        self.cid = joined.client_id
        self.join = gr.GroupJoinClient(
            joined.client_id, client.identity, joined.round_id, joined.groups, joined.directory
        )
        self._run_group = run_group
        self._step = 0
        self.assignment: gr.Assignment | None = None
        self.group_result: ClientResult | None = None
        self.silent = False
        self.result: ClientResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def start(self, now: float) -> list[Any]:
        return [_Raw(self.join.start())]

    def receive(self, data: bytes, now: float) -> list[Any]:
        step, self._step = self._step, self._step + 1
        if data[4:5] == bytes([5]):  # GroupResults: the end (or an aborted assignment)
            self._finish(data)
            return []
        if step == 0:
            return [_Raw(self.join.receive_roster(data))]
        if step == 1:
            self.assignment = self.join.receive_opens(data)
            self.group_result = self._group()
            if self.group_result is None:
                self.silent = True
                raise _GoneSilent
            return []
        raise ServerMisbehaviour("the front door sent a message after the round ended")

    def _group(self) -> ClientResult | None:
        """Fetch, check and run this client's group round."""
        asg = self.assignment
        assert asg is not None
        g = asg.group_of(self.cid)
        gjoined = self.client.join(gr.group_round_id(asg.seed, g))
        front = self.joined.params
        p = gjoined.params
        if gjoined.client_id != self.cid:
            raise ServerMisbehaviour(
                f"the group round seats this client as {gjoined.client_id}, not {self.cid}"
            )
        try:
            gr.check_group_invite(
                asg, self.cid, p, list(gjoined.directory), self.client.policy.core()
            )
        except PolicyViolation as exc:
            raise PolicyRefused(f"the group round breaks this client's policy: {exc}") from None
        for m, key in gjoined.directory.items():
            if self.joined.directory.get(m) != key:
                raise ServerMisbehaviour(f"group {g} lists client {m} with another identity key")
        q, fq = p.quant, front.quant
        if (p.mode, p.dim, q.bits, q.clip, q.max_weight, p.layout, p.he_clients) != (
            front.mode, front.dim, fq.bits, fq.clip, fq.max_weight, front.layout,
            front.he_clients,
        ):  # fmt: skip
            raise ServerMisbehaviour(f"group {g}'s round has another shape than the sharded round")
        return self._run_group(gjoined)

    def _finish(self, data: bytes) -> None:
        msg = gr.GroupResults.decode(data)
        if msg.round_id != self.joined.round_id:
            raise ServerMisbehaviour("the group results are for another round")
        if not msg.completed:
            raise RoundAborted(msg.stage or "sharded", msg.reason)
        asg, own = self.assignment, self.group_result
        if asg is None or own is None:
            raise ServerMisbehaviour("the front door published a sum before any group ran")
        p = self.joined.params
        policy = self.client.policy.core()
        rows = {r.group: r for r in msg.rows}
        if sorted(rows) != list(range(len(asg.groups))) or len(rows) != len(msg.rows):
            raise ServerMisbehaviour("the group results do not list every group once")
        contributors = msg.contributors
        if len(set(contributors)) != len(contributors):
            raise ServerMisbehaviour("the published contributor list repeats a client")
        g_own = asg.group_of(self.cid)
        cset = set(contributors)
        for g, members in enumerate(asg.groups):
            row = rows[g]
            inside = cset & set(members)
            if row.size != len(members) or len(inside) != (row.survivors if row.completed else 0):
                raise ServerMisbehaviour(f"group {g}'s published line disagrees with the sum")
            if row.completed and len(inside) < policy.min_contributors:
                raise PolicyRefused(
                    f"group {g} contributed {len(inside)} inputs, fewer than this client's"
                    f" min_contributors={policy.min_contributors}"
                )
        if cset - {c for ms in asg.groups for c in ms}:
            raise ServerMisbehaviour("the published contributors name a client of no group")
        if not rows[g_own].completed or set(own.contributors) != cset & set(asg.groups[g_own]):
            raise ServerMisbehaviour("the published sum does not carry this client's group as run")
        if len(contributors) < policy.min_contributors:
            raise PolicyRefused(
                f"the published sum has {len(contributors)} contributors, fewer than"
                f" {policy.min_contributors}"
            )
        if p.mode is not Mode.MASKED:
            self.result = self._decrypt_total(msg, contributors)
            return
        want = p.quant.values(p.dim)
        if len(msg.sums) != 8 * want:
            raise ServerMisbehaviour(
                f"the published sum has {len(msg.sums) // 8} lanes, not {want}"
            )
        sums: npt.NDArray[np.uint64] = np.frombuffer(msg.sums, dtype="<u8").astype(np.uint64)
        weighted_sum, total = kernels.dequantize(sums, p.quant, len(contributors), p.dim)
        if total != msg.total_weight:
            raise ServerMisbehaviour(
                f"the published total weight {msg.total_weight} is not the sum's {total}"
            )
        self.result = ClientResult(sums, contributors, total, weighted_sum)

    def _decrypt_total(self, msg: gr.GroupResults, contributors: tuple[int, ...]) -> ClientResult:
        """``ckks``/``hybrid``: decrypt the published encrypted total (integers only)."""
        p, secret = self.joined.params, self.secret
        assert secret is not None
        if msg.sums or msg.total_weight or len(msg.ciphertexts) != p.he.n_ciphertexts:
            raise ServerMisbehaviour(
                f"the published encrypted total has {len(msg.ciphertexts)} ciphertexts, not"
                f" {p.he.n_ciphertexts} (and no plaintext sum)"
            )
        own = secret.epoch.fingerprint
        if not constant_time_equal(msg.key_epoch, own):  # before the budget is charged
            raise ServerMisbehaviour(
                f"the encrypted total was added under CKKS key {msg.key_epoch.hex() or 'none'},"
                f" this key holder's is {own.hex()}: not decrypted"
            )
        try:
            sums = decrypt_lane_sums(secret, p, msg.ciphertexts)
        except DecryptionBudgetExhausted:
            raise
        except SecAggError as exc:
            raise ServerMisbehaviour(f"the encrypted total does not decrypt: {exc}") from None
        n = len(contributors)
        weighted_sum, total = kernels.dequantize(sums, p.quant, n, p.dim)
        if p.quant.weighted and not n <= total <= n * p.quant.max_weight:
            # the weight lane sums every contributor's weight in 1..max_weight
            raise ServerMisbehaviour(
                f"the decrypted total carries weight {total}; {n} contributors of weight"
                f" 1..{p.quant.max_weight} sum to {n}..{n * p.quant.max_weight}: it is not"
                " the sum of the published contributors"
            )
        return ClientResult(sums, contributors, total, weighted_sum)


class _GoneSilent(Exception):
    """The group round's ``on_send`` hook made the client go silent."""


def participate_sharded(
    client: Client,
    joined: JoinedRound,
    vector: npt.ArrayLike,
    weight: int = 1,
    *,
    rounding_key: bytes | None = None,
    on_send: Callable[[Message], bool] | None = None,
    key_epoch: bytes | None = None,
    he_context: HEContext | None = None,
) -> ClientResult | None:
    """Run a sharded round: assignment and result on the front door, the group round in
    between (``on_send`` sees the group round's messages only)."""
    from secagg.service.client import _Session, secret_context

    p = joined.params
    secret: ckks.SecretContext | None = None
    if p.mode is not Mode.MASKED:
        if he_context is None and client.he_secret_path is not None:
            he_context = ckks.open_secret_context(client.he_secret_path, p.he)
        if he_context is None:
            raise PolicyRefused(f"a {p.mode.name.lower()} round needs the CKKS key context")
        secret = secret_context(he_context, p.he)
        secret.require_budget(1)  # the total only: refuse before sending

    def run_group(gjoined: JoinedRound) -> ClientResult | None:
        core, _ = client._core(
            gjoined, vector, weight, rounding_key=rounding_key, he_context=secret,
            key_epoch=key_epoch, group_round=True,
        )  # fmt: skip
        return _Session(client, gjoined, core, on_send).run()

    core = FrontDoorClient(client, joined, run_group, secret)
    try:
        return _Session(client, joined, cast(Any, core), None).run()
    except _GoneSilent:
        return None
