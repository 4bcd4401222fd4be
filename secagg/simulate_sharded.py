"""In-process simulation of a sharded round: group assignment, G group rounds, one sum.

The coordinator runs the join protocol of :mod:`secagg.groups` with every simulated client
(each a :class:`~secagg.groups.GroupJoinClient`, bytes in and out), then hands each group to
an engine as one :class:`GroupSpec` (bytes). A :class:`GroupRound` runs the group's round
where the engine puts it: the group's simulated clients live beside their aggregator's
:class:`~secagg.server.SecAggServer`, every message through its byte encoding, on a fake
clock, exactly like :func:`secagg.simulate.run_round`. Before joining the group round each
simulated client recomputes the assignment from the transcript and checks the invitation
(:func:`secagg.groups.check_group_invite`); a client that refuses stays out.

A simulated client's state moves with it into its group's worker as bytes (its Ed25519
private key and join nonce); a real client never leaves its device. Inputs are seeded test
data drawn where the client runs (``numpy`` generator keyed by ``(seed, id)``; never secrets).

Engines: :class:`LocalEngine` runs the groups one after the other in this process;
:mod:`secagg.service.ray_engine` runs them on Ray actors. Both exchange only bytes, ints and
strings with the groups (no pickled objects of ours).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from secagg import ckks, graph
from secagg.client import SecAggClient, decrypt_lane_sums
from secagg.errors import ConfigurationError, RoundAborted, SecAggError
from secagg.groups import (
    GroupCoordinator,
    GroupJoinClient,
    check_group_invite,
    group_round_id,
    sharded_he_clients,
    verify_transcript,
)
from secagg.he_round import CkksClient, CkksServer
from secagg.keys import IdentityKey, random_seed
from secagg.messages import EncryptedResult, Message
from secagg.params import Mode, RoundParams, make_params
from secagg.policy import MIN_CONTRIBUTORS, ClientPolicy
from secagg.quantize import dequantize, lane_values
from secagg.rounds.base import Stage
from secagg.server import SecAggServer, StageTimeouts
from secagg.sharded_he import EncryptedGroupSum, GroupCiphertextRefused, add_group_sums
from secagg.simulate import (
    DROP_STAGES,
    SimulationConfig,
    he_params_report,
    schedule,
    withheld_from,
    withholds,
)
from secagg.wire import Reader, Writer

__all__ = [
    "GroupEngine",
    "GroupRound",
    "GroupSpec",
    "LocalEngine",
    "ShardedRoundAborted",
    "UnsupportedShardedMode",
    "simulate_sharded",
]

_STAGES = list(DROP_STAGES.values())
_NO_DROP = 255
_MAX_BLOB = 1 << 31


class ShardedRoundAborted(RoundAborted):
    """No sum is published: too few contributors in the groups that completed, or the
    job's policy aborts on any group abort."""


class UnsupportedShardedMode(ConfigurationError):
    """A sharded round asked for something only single rounds run (docs/sharding.md)."""


# --------------------------------------------------------------------------- group spec


@dataclass(frozen=True)
class Member:
    """One simulated client as it moves into its group's worker."""

    cid: int
    public_key: bytes
    private_key: bytes
    nonce: bytes
    sent: bytes
    weight: int
    drop: int  # index into DROP_STAGES, or 255


@dataclass(frozen=True)
class GroupSpec:
    """Everything a group round needs, as one byte string across the engine boundary."""

    group: int
    params: bytes
    roster: bytes
    opens: bytes
    timeout: float
    data_seed: int
    dropout: float
    corrupt: float
    min_contributors: int
    members: tuple[Member, ...]
    he_secret: bytes = b""
    """``ckks``/``hybrid``: the key holders' context, for the simulated clients only (a real
    key holder keeps it on its device); the aggregator never loads it."""
    he_public: bytes = b""
    """``ckks``/``hybrid``: the keyless context the group's aggregator sums with."""

    def encode(self) -> bytes:
        w = Writer().u32(self.group).var(self.params).var(self.roster).var(self.opens)
        w.f64(self.timeout).u64(self.data_seed).f64(self.dropout).f64(self.corrupt)
        w.u32(self.min_contributors).u32(len(self.members))
        for m in self.members:
            w.u32(m.cid).fixed(m.public_key, 32).fixed(m.private_key, 32).fixed(m.nonce, 32)
            w.var(m.sent).u64(m.weight).u8(m.drop)
        w.var(self.he_secret).var(self.he_public)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> GroupSpec:
        r = Reader(data)
        group, params, roster, opens = r.u32(), r.var(4096), r.var(_MAX_BLOB), r.var(_MAX_BLOB)
        timeout, seed, dropout, corrupt = r.f64(), r.u64(), r.f64(), r.f64()
        min_contributors, count = r.u32(), r.u32()
        members = tuple(
            Member(r.u32(), r.fixed(32), r.fixed(32), r.fixed(32), r.var(256), r.u64(), r.u8())
            for _ in range(count)
        )
        he_secret, he_public = r.var(_MAX_BLOB), r.var(_MAX_BLOB)
        r.end()
        return cls(
            group, params, roster, opens, timeout, seed, dropout, corrupt, min_contributors,
            members, he_secret, he_public,
        )  # fmt: skip


def client_input(data_seed: int, cid: int, dim: int, clip: float) -> npt.NDArray[np.float64]:
    """Seeded test input of client ``cid`` (never a secret)."""
    rng = np.random.default_rng([data_seed, cid])
    return np.clip(rng.normal(0.0, clip / 4, dim), -clip, clip)


# --------------------------------------------------------------------------- group round


class GroupRound:
    """One group's round on a fake clock, advanced :meth:`step` by :meth:`step`."""

    def __init__(self, spec_bytes: bytes) -> None:
        spec = GroupSpec.decode(spec_bytes)
        self.spec = spec
        self.params = params = RoundParams.decode(spec.params)
        policy = ClientPolicy(
            dropout=spec.dropout, corrupt=spec.corrupt, min_contributors=spec.min_contributors
        )
        directory = {m.cid: m.public_key for m in spec.members}
        invited = sorted(directory)
        self.refused: dict[int, str] = {}
        self.clients: dict[int, SecAggClient | CkksClient] = {}
        self.drop: dict[int, Stage] = {}
        self.inputs: dict[int, npt.NDArray[np.float64]] = {}
        self.rounding: dict[int, bytes] = {}
        self.weights = {m.cid: m.weight for m in spec.members}
        self.client_seconds: dict[int, float] = dict.fromkeys(invited, 0.0)
        self.up = self.down = 0
        self.server_seconds = 0.0
        self.now = 0.0
        t0 = time.perf_counter()
        secret: ckks.SecretContext | None = None
        self.server: SecAggServer | CkksServer
        if params.mode is Mode.MASKED:
            self.server = SecAggServer(
                params, directory, timeouts=StageTimeouts.uniform(spec.timeout), now=self.now
            )
        else:  # the aggregator holds the keyless context only
            he_server = ckks.load_server_context(spec.he_public, params.he)
            if params.mode is Mode.CKKS:
                self.server = CkksServer(
                    params, directory, he_server, timeout=spec.timeout, now=self.now
                )
            else:
                self.server = SecAggServer(
                    params, directory, timeouts=StageTimeouts.uniform(spec.timeout),
                    now=self.now, he_context=he_server,
                )  # fmt: skip
        self.server_seconds += time.perf_counter() - t0
        if params.mode is not Mode.MASKED:  # the simulated key holders' key
            secret = ckks.load_secret_context(spec.he_secret, params.he)
        for m in spec.members:
            t0 = time.perf_counter()
            try:  # the client's own checks of the assignment and of this group round
                asg = verify_transcript(m.cid, m.nonce, m.sent, spec.roster, spec.opens, directory)
                members = check_group_invite(asg, m.cid, params, invited, policy)
            except SecAggError as exc:
                self.refused[m.cid] = f"{type(exc).__name__}: {exc}"
                continue
            x = client_input(spec.data_seed, m.cid, params.dim, params.quant.clip)
            self.inputs[m.cid] = x
            self.rounding[m.cid] = random_seed()
            group_dir = {c: directory[c] for c in members}
            identity = IdentityKey(m.private_key)
            if params.mode is Mode.CKKS:
                assert secret is not None
                self.clients[m.cid] = CkksClient(
                    m.cid, identity, params, group_dir, x, m.weight, secret.key_holder(),
                    rounding_key=self.rounding[m.cid], policy=policy, group_round=True,
                )  # fmt: skip
            else:
                self.clients[m.cid] = SecAggClient(
                    m.cid, identity, params, group_dir, x, m.weight,
                    rounding_key=self.rounding[m.cid], policy=policy,
                    he_context=None if secret is None else secret.key_holder(),
                    group_round=True,  # hybrid: the group's sum is the coordinator's
                )  # fmt: skip
            if m.drop != _NO_DROP:
                # ckks has no stage but the upload: a dropped client never uploads
                stage = _STAGES[m.drop]
                self.drop[m.cid] = Stage.MASKED_INPUT if params.mode is Mode.CKKS else stage
            self.client_seconds[m.cid] += time.perf_counter() - t0
        self.pending: list[tuple[int, Message]] = []
        self.started = False

    def _to_server(self, cid: int, msgs: list[Message]) -> list[tuple[int, Message]]:
        out: list[tuple[int, Message]] = []
        for m in msgs:
            if withholds(self.drop.get(cid), m.TYPE):
                continue
            data = m.encode()
            self.up += len(data)
            t0 = time.perf_counter()
            try:
                out.extend(self.server.receive(cid, data, self.now))
            except SecAggError:
                out.extend(self.server.tick(self.now))
            self.server_seconds += time.perf_counter() - t0
        return out

    @property
    def done(self) -> bool:
        return self.started and self.server.done and not self.pending

    def step(self, batches: int = 1) -> bool:
        """Deliver up to ``batches`` rounds of pending messages (or fire the stage timer);
        return whether the group round is over."""
        for _ in range(batches):
            if self.done:
                break
            if not self.started:
                self.started = True
                for cid, c in self.clients.items():
                    t0 = time.perf_counter()
                    first = c.start(self.now)
                    self.client_seconds[cid] += time.perf_counter() - t0
                    self.pending.extend(self._to_server(cid, first))
                continue
            if not self.pending:
                deadline = self.server.deadline
                assert deadline is not None
                self.now = max(self.now, deadline)
                t0 = time.perf_counter()
                self.pending = self.server.tick(self.now)
                self.server_seconds += time.perf_counter() - t0
                continue
            batch, self.pending = self.pending, []
            for cid, msg in batch:
                if withheld_from(self.drop.get(cid), msg.TYPE) or cid not in self.clients:
                    continue
                if isinstance(msg, EncryptedResult) and msg.ciphertexts:
                    # sharded HE: the group's encrypted sum goes to the coordinator, not to
                    # the key holders (who refuse it); they decrypt the total only. The
                    # group round's server sends them the contributors only.
                    continue
                data = msg.encode()
                self.down += len(data)
                t0 = time.perf_counter()
                try:
                    replies = self.clients[cid].receive(data, self.now)
                except SecAggError:
                    replies = []
                self.client_seconds[cid] += time.perf_counter() - t0
                self.pending.extend(self._to_server(cid, replies))
        return self.done

    def run(self) -> bytes:
        while not self.step(16):
            pass
        return self.outcome()

    def outcome(self) -> bytes:
        """The group's result as bytes: status, reason, contributors, lane sums and the
        simulation's oracle (expected lane sums and float sum of the contributors)."""
        p = self.params
        spec = p.quant
        w = Writer().u32(self.spec.group)
        result = self.server.result
        contributors: tuple[int, ...] = () if result is None else tuple(result.contributors)
        cts: tuple[bytes, ...] = ()
        if result is not None and result.ciphertexts is not None:
            w.u8(1).var(b"").var(b"")
            sums = np.zeros(spec.values(p.dim), dtype=np.uint64)
            cts = tuple(result.ciphertexts)
        elif result is None or result.sums is None:
            err = self.server.error
            w.u8(0).var((err.stage if err else "").encode())
            w.var((err.reason if err else "the group round did not finish").encode())
            sums = np.zeros(spec.values(p.dim), dtype=np.uint64)
        else:
            w.u8(1).var(b"").var(b"")
            sums = result.sums.astype(np.uint64)
        expected = np.zeros(spec.values(p.dim), dtype=np.uint64)
        float_sum = np.zeros(p.dim)
        for cid in contributors:
            expected += lane_values(self.inputs[cid], self.weights[cid], spec, self.rounding[cid])
            float_sum += self.weights[cid] * self.inputs[cid]
        w.ids(contributors)
        w.var(sums.astype("<u8").tobytes()).var(expected.astype("<u8").tobytes())
        w.var(float_sum.astype("<f8").tobytes())
        senders = [c for c in self.clients if c not in self.drop] or list(self.client_seconds)
        w.f64(statistics.median(self.client_seconds[c] for c in senders) if senders else 0.0)
        w.f64(self.server_seconds).u64(self.up).u64(self.down)
        w.ids(sorted(self.refused))
        he = self.server.ctx.he
        epoch = b"" if he is None else he.epoch.fingerprint
        w.var(EncryptedGroupSum(self.spec.group, epoch, len(contributors), cts).encode())
        return w.getvalue()


@dataclass
class GroupOutcome:
    """A group's outcome as the coordinator reads it (decoded from bytes)."""

    group: int
    completed: bool
    stage: str
    reason: str
    contributors: tuple[int, ...]
    sums: npt.NDArray[np.uint64]
    expected: npt.NDArray[np.uint64]
    float_sum: npt.NDArray[np.float64]
    client_median: float
    server_seconds: float
    up: int
    down: int
    refused: tuple[int, ...]
    encrypted: EncryptedGroupSum
    """``ckks``/``hybrid``: the group's encrypted sum (no ciphertext in ``masked``)."""

    @classmethod
    def decode(cls, data: bytes) -> GroupOutcome:
        r = Reader(data)
        group, ok = r.u32(), r.u8()
        stage, reason = r.var(1024).decode(), r.var(1 << 16).decode()
        contributors = r.ids(1 << 24)
        sums = np.frombuffer(r.var(_MAX_BLOB), dtype="<u8").astype(np.uint64)
        expected = np.frombuffer(r.var(_MAX_BLOB), dtype="<u8").astype(np.uint64)
        float_sum = np.frombuffer(r.var(_MAX_BLOB), dtype="<f8").astype(np.float64)
        med, srv, up, down = r.f64(), r.f64(), r.u64(), r.u64()
        refused = r.ids(1 << 24)
        encrypted = EncryptedGroupSum.decode(r.var(_MAX_BLOB))
        r.end()
        return cls(
            group, bool(ok), stage, reason, contributors, sums, expected, float_sum, med, srv,
            up, down, refused, encrypted,
        )  # fmt: skip


# --------------------------------------------------------------------------- engines


class GroupEngine(Protocol):
    """Where group rounds run: bytes in (one spec per group), bytes or a failure out."""

    name: str

    @property
    def workers(self) -> int: ...

    def run_groups(self, specs: Mapping[int, bytes]) -> dict[int, bytes | str]:
        """Run every group; a group's value is its outcome bytes, or the reason (a string)
        its worker failed."""
        ...


@dataclass
class LocalEngine:
    """Groups one after the other in this process (no Ray): tests and ``--engine local``.

    ``fail`` names groups whose "worker" is killed before they finish (a fault drill with
    the same effect on the coordinator as a dead Ray actor).
    """

    fail: frozenset[int] = field(default_factory=frozenset)
    name: str = "local"

    @property
    def workers(self) -> int:
        return 1

    def run_groups(self, specs: Mapping[int, bytes]) -> dict[int, bytes | str]:
        out: dict[int, bytes | str] = {}
        for g, spec in specs.items():
            if g in self.fail:
                out[g] = "worker killed (fault drill)"
                continue
            out[g] = GroupRound(spec).run()
        return out


# --------------------------------------------------------------------------- coordinator


def _join(
    cfg: SimulationConfig, groups: int, ids: list[int], min_group: int
) -> tuple[GroupCoordinator, dict[int, GroupJoinClient], dict[int, IdentityKey], float]:
    """Run the join protocol in memory; returns the coordinator, clients, identities and
    the coordinator's seconds."""
    identities = {c: IdentityKey() for c in ids}
    directory = {c: k.public for c, k in identities.items()}
    round_id = random_seed()[:16]
    coord = GroupCoordinator(round_id, groups, directory, min_group=min_group)
    clients = {c: GroupJoinClient(c, identities[c], round_id, groups, directory) for c in ids}
    seconds = 0.0

    def deliver(
        out: list[tuple[int, bytes]], handle: Callable[[GroupJoinClient, bytes], Any]
    ) -> list[Any]:
        return [handle(clients[c], data) for c, data in out]

    t0 = time.perf_counter()
    broadcast: list[tuple[int, bytes]] = []
    for c in ids:
        broadcast += coord.receive(c, clients[c].start(), 0.0)
    seconds += time.perf_counter() - t0
    opens = deliver(broadcast, lambda cl, d: (cl.cid, cl.receive_roster(d)))
    t0 = time.perf_counter()
    broadcast = []
    for c, data in opens:
        broadcast += coord.receive(c, data, 0.0)
    seconds += time.perf_counter() - t0
    if coord.error is not None:
        raise coord.error
    deliver(broadcast, lambda cl, d: cl.receive_opens(d))
    return coord, clients, identities, seconds


def _group_params(
    cfg: SimulationConfig, size: int, round_id: bytes, he_clients: int = 0
) -> RoundParams:
    return replace(_template(cfg, size, he_clients), round_id=round_id)


_TEMPLATES: dict[tuple[Any, ...], RoundParams] = {}


def _template(cfg: SimulationConfig, size: int, he_clients: int = 0) -> RoundParams:
    mode = Mode.parse(cfg.mode)
    key = (size, cfg.dim, cfg.clip, cfg.bits, cfg.max_weight, cfg.neighbors, cfg.threshold,
           cfg.tolerated_dropout, cfg.tolerated_corrupt, mode, he_clients)  # fmt: skip
    if key not in _TEMPLATES:
        params = make_params(
            size, cfg.dim, mode=Mode.MASKED, clip=cfg.clip, bits=cfg.bits,
            max_weight=cfg.max_weight, neighbors=cfg.neighbors, threshold=cfg.threshold,
            dropout=cfg.tolerated_dropout, corrupt=cfg.tolerated_corrupt,
        )  # fmt: skip
        if mode is not Mode.MASKED:  # CKKS sized for the whole sharded round
            params = replace(params, mode=mode, he_clients=he_clients)
            _ = params.he  # InfeasibleParameters now, before any group starts
        _TEMPLATES[key] = params
    return _TEMPLATES[key]


def simulate_sharded(
    cfg: SimulationConfig,
    groups: int,
    engine: GroupEngine | None = None,
    *,
    on_group_abort: str = "publish",
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Run one sharded round and return the ``secagg simulate`` report plus ``groups``,
    ``engine`` and ``workers``.

    ``on_group_abort`` is the job's policy when a group aborts (its worker died, too many
    of its clients dropped): ``"publish"`` the other groups' sum when at least
    ``min_contributors`` contributed, ``"abort"`` the whole round.

    In ``ckks``/``hybrid`` each group returns its encrypted sum; the coordinator checks and
    adds them with the keyless context only (:func:`secagg.sharded_he.add_group_sums`) and
    a key holder of the simulation decrypts the published total, as in a single round.

    Raises
    ------
    UnsupportedShardedMode
        ``--spoil`` or DP (single rounds only).
    ShardedRoundAborted
        Never: an aborted round is reported (``status: aborted``) like a single one.
    """
    mode = Mode.parse(cfg.mode)
    if on_group_abort not in ("publish", "abort"):
        raise ConfigurationError(f"on_group_abort must be publish or abort, not {on_group_abort!r}")
    if cfg.spoil or cfg.dp_epsilon is not None:
        raise UnsupportedShardedMode("--spoil and --dp-epsilon run with single rounds only")
    engine = engine or LocalEngine()
    policy = cfg.policy or ClientPolicy(
        dropout=graph.DEFAULT_DROPOUT if cfg.tolerated_dropout is None else cfg.tolerated_dropout,
        corrupt=graph.DEFAULT_CORRUPT if cfg.tolerated_corrupt is None else cfg.tolerated_corrupt,
    )
    min_contributors = max(policy.min_contributors, MIN_CONTRIBUTORS)
    rng = random.Random(cfg.seed)  # noqa: S311 -- picks test data and dropouts, no secrets
    ids = list(range(1, cfg.clients + 1))
    weights = {cid: rng.randint(1, cfg.max_weight) for cid in ids}
    plan = schedule(cfg, ids, rng)
    if mode is Mode.MASKED and cfg.clients * cfg.max_weight * ((1 << cfg.bits) - 1) >= 1 << 64:
        raise ConfigurationError("the total sum would not fit 64 bits; lower bits or max_weight")
    wall0 = time.perf_counter()
    coord, clients, identities, coord_seconds = _join(cfg, groups, ids, policy.min_clients)
    asg = coord.assignment
    assert asg is not None
    specs: dict[int, bytes] = {}
    params_of: dict[int, RoundParams] = {}
    data_seed = cfg.seed
    he_clients = sharded_he_clients(mode, sum(len(m) for m in asg.groups), len(asg.groups))
    he_secret = he_public = b""
    he_report: dict[str, Any] = {}
    server_ctx: ckks.ServerContext | None = None
    if mode is not Mode.MASKED:
        he = _template(cfg, len(asg.groups[0]), he_clients).he
        t0 = time.perf_counter()
        he_secret = ckks.make_secret_context(he)  # the key holders' (simulated clients')
        he_public = ckks.make_public_context(he_secret)
        he_report = he_params_report(
            he, he_clients=he_clients, keygen_seconds=time.perf_counter() - t0
        )
        server_ctx = ckks.load_server_context(he_public, he)  # the coordinator's: no key
    for g, members in enumerate(asg.groups):
        params_of[g] = params = _group_params(
            cfg, len(members), group_round_id(asg.seed, g), he_clients
        )
        specs[g] = GroupSpec(
            g, params.encode(), coord.roster_bytes, coord.opens_bytes, timeout, data_seed,
            policy.dropout, policy.corrupt, policy.min_contributors,
            tuple(
                Member(c, identities[c].public, identities[c].private_bytes, clients[c].nonce,
                       clients[c].sent, weights[c],
                       _STAGES.index(plan[c]) if c in plan else _NO_DROP)
                for c in members
            ),
            he_secret, he_public,
        ).encode()  # fmt: skip
    raw = engine.run_groups(specs)
    t0 = time.perf_counter()
    outcomes: dict[int, GroupOutcome] = {}
    rows: list[dict[str, Any]] = []
    for g, members in enumerate(asg.groups):
        value = raw.get(g, "no outcome returned")
        row: dict[str, Any] = {"group": g, "size": len(members)}
        if isinstance(value, str):
            row.update(survivors=0, status="aborted", reason=f"worker failed: {value}")
        else:
            o = outcomes[g] = GroupOutcome.decode(value)
            row["survivors"] = len(o.contributors)
            row["status"] = "completed" if o.completed else "aborted"
            if not o.completed:
                row["reason"] = f"stage {o.stage}: {o.reason}"
            if o.refused:
                row["refused"] = list(o.refused)
        rows.append(row)
    total_cts: tuple[bytes, ...] = ()
    if server_ctx is not None:
        total_cts = _add_encrypted(server_ctx, mode, outcomes, rows)
    done = [o for o in outcomes.values() if o.completed]
    contributors = sorted(c for o in done for c in o.contributors)
    aborted = [r for r in rows if r["status"] == "aborted"]
    dim = cfg.dim
    spec0 = params_of[0].quant
    report: dict[str, Any] = {
        "mode": mode.name.lower(),
        "clients": cfg.clients,
        "dim": dim,
        "bits": cfg.bits,
        "neighbors": 0 if mode is Mode.CKKS else params_of[0].degree,
        "threshold": params_of[0].threshold,
        "dropped": {str(c): s.value for c, s in sorted(plan.items())},
        "warnings": list(params_of[0].warnings),
        "engine": engine.name,
        "workers": engine.workers,
        "groups": rows,
        "assignment_seed": asg.seed.hex(),
    }
    if he_report:
        report["he"] = he_report
    abort: tuple[str, str] | None = None
    if aborted and on_group_abort == "abort":
        abort = (
            "sharded",
            f"groups {[r['group'] for r in aborted]} aborted and the job's policy aborts the round",
        )
    elif len(contributors) < min_contributors:
        abort = (
            "sharded",
            f"{len(contributors)} contributors in completed groups; the round needs at least"
            f" {min_contributors}",
        )
    sums = np.zeros(spec0.values(dim), dtype=np.uint64)
    if abort is None and mode is not Mode.MASKED:
        # a key holder decrypts the published total, as in a single round; a total that
        # does not decrypt (a group summed under another key) releases nothing
        holder = ckks.load_secret_context(he_secret, params_of[0].he)
        try:
            sums = decrypt_lane_sums(holder, params_of[0], total_cts)
        except SecAggError as exc:
            abort = ("decrypt", f"the encrypted total does not decrypt: {exc}")
    if abort is not None:
        err = ShardedRoundAborted(*abort)
        report.update(
            status="aborted", abort={"stage": err.stage, "reason": err.reason},
            blamed=[], survivors=0, exact=False, max_abs_error=None,
        )  # fmt: skip
    else:
        # masked: each group sum is an exact integer below 2^64 / G; their sum is exact.
        # ckks/hybrid: the decrypted total, integers (CKKS noise removed by rounding).
        expected = np.zeros_like(sums)
        float_sum = np.zeros(dim)
        for o in done:
            if mode is Mode.MASKED:
                sums += o.sums
            expected += o.expected
            float_sum += o.float_sum
        weighted_sum, _ = dequantize(sums, spec0, len(contributors), dim)
        report.update(
            status="completed",
            partial=bool(aborted),
            survivors=len(contributors),
            exact=bool(np.array_equal(expected, sums)),
            max_abs_error=float(np.max(np.abs(weighted_sum - float_sum))),
            quantization_step=1.0 / spec0.scale,
        )
    coord_seconds += time.perf_counter() - t0
    wall = time.perf_counter() - wall0
    report["seconds"] = {
        "client_median": statistics.median(o.client_median for o in outcomes.values())
        if outcomes
        else 0.0,
        "server": sum(o.server_seconds for o in outcomes.values()),
        "coordinator": coord_seconds,
        "wall": wall,
    }
    senders = max(1, sum(len(asg.groups[g]) for g in outcomes))
    report["bytes"] = {
        "upload_per_client": sum(o.up for o in outcomes.values()) / senders,
        "download_per_client": sum(o.down for o in outcomes.values()) / senders,
        "raw_float32_per_client": 4 * dim,
    }
    return report


def _add_encrypted(
    ctx: ckks.ServerContext,
    mode: Mode,
    outcomes: dict[int, GroupOutcome],
    rows: list[dict[str, Any]],
) -> tuple[bytes, ...]:
    """Add the completed groups' ciphertexts at the coordinator (keyless context only).

    A group whose result the coordinator refuses (:class:`GroupCiphertextRefused`: another
    key epoch, parameters, level or scale) is recorded as aborted with that reason and left
    out; the policy then decides as for any aborted group. Returns the encrypted total
    (empty when no group completed)."""
    while True:
        done = [o for o in outcomes.values() if o.completed]
        if not done:
            return ()
        try:
            cts, _ = add_group_sums(ctx, mode, [o.encrypted for o in done])
        except GroupCiphertextRefused as exc:
            g = exc.group
            outcomes[g] = replace(outcomes[g], completed=False, stage="sharded", reason=str(exc))
            rows[g].update(status="aborted", reason=f"result refused: {exc}")
            continue
        return cts
