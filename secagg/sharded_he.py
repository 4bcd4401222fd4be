"""The coordinator's half of a sharded ``ckks``/``hybrid`` round: add the group ciphertexts.

Each group runs the single-round protocol of its mode on its aggregator
(:class:`~secagg.he_round.CkksServer` or a hybrid :class:`~secagg.server.SecAggServer`); the
group's result is its encrypted sum (SEAL serializations, as a single round publishes it) and
its contributor count. In ``hybrid`` the group's masks cancel inside the group (its
aggregator adds the dropped members' negated masks as a plaintext), so a group ciphertext
already encrypts the group's packed lane sums plus multiples of ``2^mask_bits``, which the
key holders' reduction modulo ``2^mask_bits`` removes from the total as from a single sum.

The coordinator adds the group ciphertexts with the keyless context
(:class:`~secagg.ckks_context.ServerContext`, SEAL ``Evaluator.add_inplace`` through
:meth:`~secagg.ckks_ops.CiphertextSum.merge`) and publishes one encrypted total; it never
holds a secret key (:func:`add_group_sums` refuses any other context) and sees nothing.
The parameters of every group round are sized for the whole round
(:func:`secagg.groups.sharded_he_clients`), which every client checks, so the total fits its
lanes, carries and noise bound.

What the coordinator checks in what a worker returns (the worker is not trusted with the
rest of the round): the key epoch it claims is the coordinator's; every ciphertext parses
under the coordinator's parameters at the fresh level and scale (SEAL ``parms_id``, size,
ring degree, primes, scale: :meth:`~secagg.ckks_context._HEContext._load_ciphertext`); the
counts add up to at most the summands the parameters allow. A ciphertext under another key
of the same parameters cannot be told apart (semantic security): the key holders' decryption
then fails its integer check (:class:`~secagg.errors.DecryptionError`) and nothing is
released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from secagg.ckks_context import ServerContext
from secagg.ckks_ops import CiphertextSum
from secagg.errors import ConfigurationError, MalformedMessage
from secagg.params import Mode
from secagg.wire import Reader, Writer

__all__ = ["EncryptedGroupSum", "GroupCiphertextRefused", "add_group_sums"]

_MAX_CT = 1 << 28
_MAX_CTS = 1 << 16


class GroupCiphertextRefused(MalformedMessage):
    """A group result the coordinator will not add: another key epoch, parameters, level or
    scale, a malformed ciphertext, or counts beyond what the parameters allow. ``group``
    names the group."""

    def __init__(self, message: str, *, group: int) -> None:
        super().__init__(message, stage="sharded")
        self.group = group


@dataclass(frozen=True)
class EncryptedGroupSum:
    """One group's result in a sharded HE round: its encrypted sum and contributor count.

    ``key_epoch`` is the fingerprint of the CKKS key epoch the group's aggregator summed
    under (:attr:`secagg.ckks_budget.KeyEpoch.fingerprint`).
    """

    group: int
    key_epoch: bytes
    contributors: int
    ciphertexts: tuple[bytes, ...]

    def encode(self) -> bytes:
        w = Writer().u32(self.group).var(self.key_epoch).u32(self.contributors)
        w.u32(len(self.ciphertexts))
        for ct in self.ciphertexts:
            w.var(ct)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> EncryptedGroupSum:
        r = Reader(data)
        group, epoch, count, n = r.u32(), r.var(64), r.u32(), r.u32()
        if n > _MAX_CTS:
            raise MalformedMessage(f"group sum of {n} ciphertexts exceeds {_MAX_CTS}")
        cts = tuple(r.var(_MAX_CT) for _ in range(n))
        r.end()
        return cls(group, epoch, count, cts)


def add_group_sums(
    ctx: ServerContext,
    mode: Mode,
    sums: Sequence[EncryptedGroupSum],
) -> tuple[tuple[bytes, ...], int]:
    """Add the completed groups' encrypted sums; return the encrypted total and its count.

    Parameters
    ----------
    ctx:
        The coordinator's keyless context (:func:`secagg.ckks.load_server_context`); a key
        holder's context is refused, so the coordinator cannot decrypt a group sum.
    mode:
        ``ckks`` or ``hybrid`` (checked against the context's parameters).
    sums:
        The completed groups' results (in any order: addition commutes).

    Raises
    ------
    ConfigurationError
        A context that is not a keyless :class:`~secagg.ckks_context.ServerContext`, another
        mode, or no group to add.
    GroupCiphertextRefused
        Naming the group and what does not match (one line); nothing is published.
    """
    if type(ctx) is not ServerContext:
        raise ConfigurationError(
            f"the coordinator adds group ciphertexts with a keyless ServerContext only, not a"
            f" {type(ctx).__name__}: it must never hold a secret key"
        )
    if mode is Mode.MASKED or ctx.params.mode != mode.name.lower():
        raise ConfigurationError(
            f"context is for {ctx.params.mode} rounds; cannot add {mode.name.lower()} group sums"
        )
    items = list(sums)
    if not items:
        raise ConfigurationError("no completed group to add")
    acc = CiphertextSum(ctx)
    fingerprint = ctx.epoch.fingerprint
    limit = ctx.params.n_clients
    for s in sorted(items, key=lambda s: s.group):
        if s.key_epoch != fingerprint:
            raise GroupCiphertextRefused(
                f"group {s.group} summed under CKKS key {s.key_epoch.hex()}, the round's key is"
                f" {fingerprint.hex()}: refusing its ciphertexts",
                group=s.group,
            )
        if s.contributors < 1 or acc.count + s.contributors > limit:
            raise GroupCiphertextRefused(
                f"group {s.group} claims {s.contributors} contributors; with {acc.count} already"
                f" summed the parameters allow {limit}",
                group=s.group,
            )
        try:
            acc.merge(s.ciphertexts, s.contributors)
        except (MalformedMessage, ConfigurationError) as exc:
            raise GroupCiphertextRefused(
                f"group {s.group}'s ciphertexts do not match the round's CKKS context"
                f" ({ctx.params.describe()}): {exc}",
                group=s.group,
            ) from None
    count = acc.count
    return tuple(acc.finish()), count
